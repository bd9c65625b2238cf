"""Wire encoding of (masked) model states: what crosses the network, strictly validated.

A payload is a flat ``dict[str, np.ndarray]`` keyed ``"<kind>/<tensor name>"``:

- ``dense/<n>``: the whole tensor, its shape and dtype exactly (buffers such as BatchNorm's
  int64 ``num_batches_tracked`` included; masks never cover integer tensors).
- ``mask/<n>``: the bool mask packed 8 per byte (``np.packbits`` of the C-order flattening,
  big-endian bit order, padding bits zero): ``ceil(numel / 8)`` uint8.
- ``value/<n>``: the kept entries ``w[m]`` in C order, 1-D, the tensor's dtype.
- ``index/<n>``: flat C-order indices of a sparse entry (int32 when they fit, else int64).

Server -> client (``encode_down``) sends mask + values for masked tensors; client -> server
(``encode_up``) sends values only, since the server knows the mask; ``encode_sparse`` sends
(index, value) pairs, e.g. gradients or scores at chosen positions. Every ``decode_*`` checks
each entry against a template ``name -> (shape, dtype)`` and raises :class:`WireError`,
naming the tensor and the client, on anything unexpected, non-finite float values included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Template = dict[str, tuple[tuple[int, ...], np.dtype]]
Payload = dict[str, np.ndarray]


class WireError(ValueError):
    """A payload entry is malformed; the message names the client and the tensor."""

    def __init__(self, client: str, tensor: str, problem: str) -> None:
        self.client, self.tensor, self.problem = str(client), str(tensor), problem
        who = "server" if self.client == "server" else f"client {self.client}"
        super().__init__(f"{who}: tensor {self.tensor!r}: {problem}")

    def __reduce__(self):
        return (type(self), (self.client, self.tensor, self.problem))


# ----------------------------------------------------------------------------- masks


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bool array -> ``ceil(numel / 8)`` uint8 (C-order flattening, np.packbits)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"pack_mask expects a bool array, got dtype {mask.dtype}")
    return np.packbits(mask.reshape(-1))


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...], name: str, client: str
                ) -> np.ndarray:
    """Strict inverse of :func:`pack_mask`: uint8, exact byte length, zero padding bits."""
    n = math.prod(shape)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        got = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise WireError(client, name, f"packed mask must be uint8, got {got}")
    nbytes = (n + 7) // 8
    if packed.ndim != 1 or packed.size != nbytes:
        raise WireError(client, name, f"packed mask has shape {packed.shape}, expected "
                                      f"({nbytes},) for tensor shape {tuple(shape)}")
    pad = (-n) % 8
    if pad and int(packed[-1]) & ((1 << pad) - 1):
        raise WireError(client, name, "packed mask has padding bits set in its last byte")
    return np.unpackbits(packed, count=n).astype(np.bool_).reshape(shape)


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """A symmetric (n, n) matrix as its upper triangle, row by row: n(n+1)/2 values."""
    return np.ascontiguousarray(matrix[np.triu_indices(matrix.shape[0])])


def from_upper_triangle(values: np.ndarray, n: int) -> np.ndarray:
    """The symmetric (n, n) matrix whose upper triangle ``values`` are (row by row)."""
    full = np.zeros((n, n), dtype=values.dtype)
    full[np.triu_indices(n)] = values
    return full + np.triu(full, 1).T


def check_binary(mask: np.ndarray, name: str, client: str) -> np.ndarray:
    """Bool view of a bool or {0, 1}-integer mask; anything else is a non-binary mask."""
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        bad = arr[(arr != 0) & (arr != 1)]
        if bad.size == 0:
            return arr.astype(np.bool_)
        raise WireError(client, name, f"non-binary mask: contains {bad.reshape(-1)[0]!r}")
    raise WireError(client, name, f"non-binary mask: dtype {arr.dtype} is neither bool nor "
                                  "integer 0/1")


# ----------------------------------------------------------------------------- checks


def _array(arr: object, name: str, client: str, kind: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise WireError(client, name, f"{kind} entry is {type(arr).__name__}, not an ndarray")
    return arr


def _check_finite(arr: np.ndarray, name: str, client: str) -> np.ndarray:
    """NaN or Inf in a float entry would poison every average it enters: refused."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise WireError(client, name, f"{int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _check_dense(arr: object, shape: tuple, dtype: np.dtype, name: str, client: str
                 ) -> np.ndarray:
    arr = _array(arr, name, client, "dense")
    if arr.dtype != dtype:
        raise WireError(client, name, f"dtype mismatch: got {arr.dtype}, expected {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise WireError(client, name, f"shape mismatch: got {tuple(arr.shape)}, expected "
                                      f"{tuple(shape)}")
    return _check_finite(arr, name, client).copy()


def _check_values(arr: object, count: int, dtype: np.dtype, name: str, client: str
                  ) -> np.ndarray:
    arr = _array(arr, name, client, "value")
    if arr.dtype != dtype:
        raise WireError(client, name, f"dtype mismatch: values are {arr.dtype}, expected {dtype}")
    if arr.ndim != 1:
        raise WireError(client, name, f"shape mismatch: values must be 1-D, got {arr.shape}")
    if arr.size != count:
        raise WireError(client, name, f"wrong number of values: got {arr.size}, expected {count}")
    return _check_finite(arr, name, client)


def _scatter(values: object, mask: np.ndarray, dtype: np.dtype, name: str, client: str
             ) -> np.ndarray:
    """Dense tensor with ``values`` at the mask's kept positions (C order), zeros elsewhere."""
    values = _check_values(values, int(mask.sum()), dtype, name, client)
    dense = np.zeros(mask.shape, dtype=dtype)
    dense[mask] = values
    return dense


def _norm_template(template: Mapping) -> Template:
    return {n: (tuple(int(d) for d in s), np.dtype(t)) for n, (s, t) in template.items()}


def _group(payload: Mapping, kinds: tuple[str, ...], template: Template, client: str
           ) -> dict[str, dict[str, object]]:
    """Split keys into name -> {kind: array}; reject unknown kinds, unknown and missing names."""
    groups: dict[str, dict[str, object]] = {}
    for key, arr in payload.items():
        kind, sep, name = str(key).partition("/")
        if not sep or kind not in kinds:
            raise WireError(client, name if sep else key,
                            f"unknown entry kind {kind!r} in key {key!r}; expected {list(kinds)}")
        if name not in template:
            raise WireError(client, name, f"unknown tensor (key {key!r} not in the template)")
        groups.setdefault(name, {})[kind] = arr
    for name in template:
        if name not in groups:
            raise WireError(client, name, "missing tensor: no entry in the payload")
    return groups


def _expect(entry: dict, kinds: set[str], name: str, client: str) -> None:
    if set(entry) != kinds:
        raise WireError(client, name, f"entries {sorted(entry)} where {sorted(kinds)} expected")


def _server_mask(mask: object, template: Template, name: str, client: str) -> np.ndarray:
    if name not in template:
        raise WireError(client, name, "mask for a tensor that is not in the template")
    mask = check_binary(mask, name, client)
    if tuple(mask.shape) != template[name][0]:
        raise WireError(client, name, f"shape mismatch: mask {tuple(mask.shape)}, tensor "
                                      f"{template[name][0]}")
    return mask


# ----------------------------------------------------------------------------- down / up


def template_of(state: Mapping[str, np.ndarray]) -> Template:
    """name -> (shape, dtype) of a state, the reference every decoder checks against."""
    return {n: (tuple(np.asarray(a).shape), np.asarray(a).dtype) for n, a in state.items()}


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in a payload."""
    return sum(int(np.asarray(a).nbytes) for a in payload.values())


def _masked_entries(state: Mapping, masks: Mapping, client: str
                    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """name -> (array, bool mask or None), validating the masks against the state."""
    template = template_of(state)
    out = {n: (np.asarray(a), None) for n, a in state.items()}
    for name, mask in masks.items():
        mask = _server_mask(mask, template, name, client)
        if not np.issubdtype(template[name][1], np.floating):
            raise WireError(client, name, f"masks cover floating tensors only, not "
                                          f"{template[name][1]}")
        out[name] = (out[name][0], mask)
    return out


def encode_down(state: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                *, client: str = "server") -> Payload:
    """Server -> client: ``mask/`` + ``value/`` for masked tensors, ``dense/`` for the rest."""
    payload: Payload = {}
    for name, (arr, mask) in _masked_entries(state, masks, client).items():
        if mask is None:
            payload[f"dense/{name}"] = arr
        else:
            payload[f"mask/{name}"] = pack_mask(mask)
            payload[f"value/{name}"] = arr[mask]  # (popcount,) in C order
    return payload


def decode_down(payload: Mapping[str, np.ndarray], template: Mapping, client: str = "server"
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Dense state (zeros at pruned positions) and bool masks from an ``encode_down`` payload."""
    template = _norm_template(template)
    groups = _group(payload, ("mask", "value", "dense"), template, client)
    state, masks = {}, {}
    for name, (shape, dtype) in template.items():
        entry = groups[name]
        if "dense" in entry:
            _expect(entry, {"dense"}, name, client)
            state[name] = _check_dense(entry["dense"], shape, dtype, name, client)
            continue
        _expect(entry, {"mask", "value"}, name, client)
        masks[name] = unpack_mask(entry["mask"], shape, name, client)
        state[name] = _scatter(entry["value"], masks[name], dtype, name, client)
    return state, masks


def encode_up(state: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
              *, client: str = "local") -> Payload:
    """Client -> server: ``value/`` (kept entries) for masked tensors, ``dense/`` for the rest."""
    payload: Payload = {}
    for name, (arr, mask) in _masked_entries(state, masks, client).items():
        if mask is None:
            payload[f"dense/{name}"] = arr
        else:
            payload[f"value/{name}"] = arr[mask]  # (popcount,) in C order
    return payload


def decode_up(payload: Mapping[str, np.ndarray], template: Mapping,
              masks: Mapping[str, np.ndarray], client: str) -> dict[str, np.ndarray]:
    """Dense state (zeros at pruned positions) from an ``encode_up`` payload and the server's
    masks."""
    template = _norm_template(template)
    bool_masks = {n: _server_mask(m, template, n, client) for n, m in masks.items()}
    groups = _group(payload, ("value", "dense"), template, client)
    state = {}
    for name, (shape, dtype) in template.items():
        entry = groups[name]
        if name in bool_masks:
            _expect(entry, {"value"}, name, client)
            state[name] = _scatter(entry["value"], bool_masks[name], dtype, name, client)
        else:
            _expect(entry, {"dense"}, name, client)
            state[name] = _check_dense(entry["dense"], shape, dtype, name, client)
    return state


# ----------------------------------------------------------------------------- sparse


def _check_sparse(index: object, values: object, numel: int | None, dtype: np.dtype | None,
                  name: str, client: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate flat indices (in [0, numel) when known, unique) and values of ``dtype``
    (when known); return (int64 indices, values)."""
    index = _array(index, name, client, "index")
    values = _array(values, name, client, "value")
    if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
        raise WireError(client, name, f"index must be a 1-D integer array, got {index.dtype} "
                                      f"{index.shape}")
    if dtype is not None and values.dtype != dtype:
        raise WireError(client, name, f"dtype mismatch: values are {values.dtype}, expected "
                                      f"{dtype}")
    if values.ndim != 1 or values.size != index.size:
        raise WireError(client, name, f"length mismatch: {index.size} indices, values of "
                                      f"shape {values.shape}")
    limit = numel if numel is not None else np.iinfo(np.int64).max
    if index.size and (int(index.min()) < 0 or int(index.max()) >= limit):
        bad = index[(index < 0) | (index >= limit)][0]
        bound = f"[0, {numel})" if numel is not None else "[0, 2**63)"
        raise WireError(client, name, f"index {int(bad)} out of range {bound}")
    uniq, counts = np.unique(index, return_counts=True)
    if uniq.size != index.size:
        raise WireError(client, name, f"duplicate index {int(uniq[counts > 1][0])}")
    return index.astype(np.int64), _check_finite(values, name, client)


def _index_dtype(index: np.ndarray, numel: int | None) -> type:
    if numel is not None:
        return np.int32 if numel < 2**31 else np.int64
    return np.int32 if index.size == 0 or int(index.max()) < 2**31 else np.int64


def encode_sparse(entries: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  template: Mapping | None = None, *, client: str = "local") -> Payload:
    """name -> (flat indices, values) as ``index/<n>`` + ``value/<n>``.

    Indices are int32 when the tensor has fewer than 2**31 entries (from ``template`` when
    given, which also validates the entries; else from the largest index), else int64.
    """
    tmpl = _norm_template(template) if template is not None else None
    payload: Payload = {}
    for name, (index, values) in entries.items():
        index, values = np.asarray(index), np.asarray(values)
        if tmpl is not None and name not in tmpl:
            raise WireError(client, name, "unknown tensor (not in the template)")
        numel, dtype = (math.prod(tmpl[name][0]), tmpl[name][1]) if tmpl is not None \
            else (None, None)
        index, values = _check_sparse(index, values, numel, dtype, name, client)
        payload[f"index/{name}"] = index.astype(_index_dtype(index, numel))
        payload[f"value/{name}"] = values
    return payload


def decode_sparse(payload: Mapping[str, np.ndarray], template: Mapping, client: str
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (int64 flat indices, values) from an ``encode_sparse`` payload, validated."""
    template = _norm_template(template)
    groups = _group(payload, ("index", "value"), template, client)
    out = {}
    for name, (shape, dtype) in template.items():
        entry = groups[name]
        _expect(entry, {"index", "value"}, name, client)
        index, values = _check_sparse(entry["index"], entry["value"], math.prod(shape), dtype,
                                      name, client)
        out[name] = (index, values.copy())
    return out
