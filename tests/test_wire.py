"""Wire encoding: exact round trips and a WireError naming tensor and client for bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedprune.masks import (
    WireError,
    check_binary,
    decode_down,
    decode_sparse,
    decode_up,
    encode_down,
    encode_sparse,
    encode_up,
    pack_mask,
    payload_nbytes,
    template_of,
    unpack_mask,
)

CLIENT = "node42"


def make_state() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    state = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 13)).astype(np.float16),
        "bn.running_mean": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(123456789012, dtype=np.int64),  # 0-d int64
    }
    masks = {
        "conv.weight": rng.random((4, 3, 3, 3)) < 0.3,
        "fc.weight": rng.random((5, 13)) < 0.5,
    }
    return state, masks


def masked(state, masks):
    return {n: np.where(masks[n], a, 0).astype(a.dtype) if n in masks else a
            for n, a in state.items()}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert got[n].shape == want[n].shape, n
        np.testing.assert_array_equal(got[n], want[n])


def assert_wire_error(fn, *args, tensor: str, client: str = CLIENT, match: str = ""):
    with pytest.raises(WireError) as info:
        fn(*args)
    msg = str(info.value)
    who = "server" if client == "server" else f"client {client}"
    assert msg.startswith(f"{who}: tensor {tensor!r}: "), msg
    assert info.value.tensor == tensor and info.value.client == client
    assert match in msg, msg
    return info.value


# ----------------------------------------------------------------------------- round trips


def test_pack_mask_size_and_round_trip():
    for n in (1, 7, 8, 9, 13, 216):
        mask = np.random.default_rng(n).random(n) < 0.5
        packed = pack_mask(mask)
        assert packed.dtype == np.uint8 and packed.shape == (-(-n // 8),)
        np.testing.assert_array_equal(unpack_mask(packed, (n,), "t", CLIENT), mask)
    mask2d = np.array([[True, False, False], [False, True, True]])
    assert pack_mask(mask2d).tolist() == [0b10001100]  # C order, first element = MSB
    with pytest.raises(ValueError):
        pack_mask(mask2d.astype(np.int8))


def test_down_round_trip_is_exact():
    state, masks = make_state()
    payload = encode_down(state, masks)
    assert set(payload) == {
        "mask/conv.weight", "value/conv.weight", "mask/fc.weight", "value/fc.weight",
        "dense/conv.bias", "dense/bn.running_mean", "dense/bn.num_batches_tracked",
    }
    assert payload["value/fc.weight"].dtype == np.float16
    assert payload["value/conv.weight"].size == masks["conv.weight"].sum()
    got_state, got_masks = decode_down(payload, template_of(state), CLIENT)
    assert_same(got_state, masked(state, masks))
    assert_same(got_masks, masks)
    assert got_state["bn.num_batches_tracked"] == 123456789012


def test_down_payload_is_smaller_than_dense():
    state, masks = make_state()
    sparse = payload_nbytes(encode_down(state, masks))
    dense = sum(a.nbytes for a in state.values())
    packed = sum(-(-m.size // 8) for m in masks.values())
    kept = 4 * masks["conv.weight"].sum() + 2 * masks["fc.weight"].sum()
    other = sum(state[n].nbytes for n in state if n not in masks)
    assert sparse == packed + kept + other < dense


def test_up_round_trip_is_exact():
    state, masks = make_state()
    payload = encode_up(state, masks)
    assert "mask/conv.weight" not in payload
    assert payload["value/fc.weight"].size == masks["fc.weight"].sum()
    assert_same(decode_up(payload, template_of(state), masks, CLIENT), masked(state, masks))


def test_sparse_round_trip_is_exact():
    state, _ = make_state()
    template = template_of(state)
    entries = {
        "conv.weight": (np.array([107, 0, 5]), np.array([1.5, -2.0, 3.25], np.float32)),
        "fc.weight": (np.array([], np.int64), np.array([], np.float16)),
        "bn.num_batches_tracked": (np.array([0]), np.array([9], np.int64)),
    }
    sub = {n: template[n] for n in entries}
    payload = encode_sparse(entries, sub)
    assert payload["index/conv.weight"].dtype == np.int32
    got = decode_sparse(payload, sub, CLIENT)
    for n, (idx, val) in entries.items():
        np.testing.assert_array_equal(got[n][0], idx)
        assert got[n][1].dtype == val.dtype
        np.testing.assert_array_equal(got[n][1], val)


def test_sparse_index_dtype_widens_for_huge_tensors():
    huge = {"w": ((2**31,), np.dtype(np.float32))}
    payload = encode_sparse({"w": (np.array([2**31 - 1]), np.array([1.0], np.float32))}, huge)
    assert payload["index/w"].dtype == np.int64
    assert decode_sparse(payload, huge, CLIENT)["w"][0].tolist() == [2**31 - 1]


def test_wire_error_is_value_error_and_pickles():
    err = WireError("3", "layer1.0.conv1.weight", "bad")
    assert isinstance(err, ValueError)
    assert str(err) == "client 3: tensor 'layer1.0.conv1.weight': bad"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.tensor == err.tensor


# ----------------------------------------------------------------------------- bad down input


def down():
    state, masks = make_state()
    return encode_down(state, masks), template_of(state)


def _replace(payload, key, value):
    return {**payload, key: value}


def _drop(payload, key):
    return {k: v for k, v in payload.items() if k != key}


def _set_padding(payload):
    packed = payload["mask/fc.weight"].copy()  # 65 bits: 7 padding bits in the last byte
    packed[-1] |= 1
    return _replace(payload, "mask/fc.weight", packed)


DOWN_CASES = {
    "unknown name": (lambda p: _replace(p, "dense/ghost.weight", np.zeros(2, np.float32)),
                     "ghost.weight", "unknown tensor"),
    "missing tensor": (lambda p: _drop(p, "dense/bn.num_batches_tracked"),
                       "bn.num_batches_tracked", "missing"),
    "missing values": (lambda p: _drop(p, "value/conv.weight"), "conv.weight", "expected"),
    "shape mismatch": (lambda p: _replace(p, "dense/conv.bias", np.zeros((2, 2), np.float32)),
                       "conv.bias", "shape mismatch"),
    "dtype mismatch dense": (lambda p: _replace(p, "dense/bn.num_batches_tracked",
                                                np.array(1, np.int32)),
                             "bn.num_batches_tracked", "dtype mismatch"),
    "dtype mismatch value": (lambda p: _replace(p, "value/fc.weight",
                                                p["value/fc.weight"].astype(np.float32)),
                             "fc.weight", "dtype mismatch"),
    "padding bits set": (_set_padding, "fc.weight", "padding"),
    "mask byte length": (lambda p: _replace(p, "mask/fc.weight", p["mask/fc.weight"][:-1]),
                         "fc.weight", "expected"),
    "mask not uint8": (lambda p: _replace(p, "mask/fc.weight",
                                          p["mask/fc.weight"].astype(np.int8)),
                       "fc.weight", "uint8"),
    "wrong value count": (lambda p: _replace(p, "value/conv.weight", p["value/conv.weight"][1:]),
                          "conv.weight", "wrong number of values"),
    "unknown kind": (lambda p: _replace(p, "weird/conv.bias", np.zeros(4, np.float32)),
                     "conv.bias", "unknown entry kind"),
}


@pytest.mark.parametrize("case", sorted(DOWN_CASES))
def test_decode_down_rejects(case):
    corrupt, tensor, match = DOWN_CASES[case]
    payload, template = down()
    assert_wire_error(decode_down, corrupt(payload), template, CLIENT, tensor=tensor, match=match)


def test_decode_down_default_client_is_server():
    payload, template = down()
    err = assert_wire_error(decode_down, _drop(payload, "dense/conv.bias"), template,
                            tensor="conv.bias", client="server")
    assert str(err).startswith("server: ")


# ----------------------------------------------------------------------------- bad up input


def up():
    state, masks = make_state()
    return encode_up(state, masks), template_of(state), masks


UP_CASES = {
    "unknown name": (lambda p, m: (_replace(p, "dense/ghost", np.zeros(1, np.float32)), m),
                     "ghost", "unknown tensor"),
    "missing tensor": (lambda p, m: (_drop(p, "value/fc.weight"), m), "fc.weight", "missing"),
    "shape mismatch": (lambda p, m: (_replace(p, "dense/bn.running_mean",
                                              np.zeros(5, np.float32)), m),
                       "bn.running_mean", "shape mismatch"),
    "dtype mismatch": (lambda p, m: (_replace(p, "dense/conv.bias",
                                              p["dense/conv.bias"].astype(np.float64)), m),
                       "conv.bias", "dtype mismatch"),
    "non-binary mask": (lambda p, m: (p, {**m, "fc.weight": m["fc.weight"].astype(np.int64) * 2}),
                        "fc.weight", "non-binary mask"),
    "wrong value count": (lambda p, m: (_replace(p, "value/fc.weight",
                                                 np.concatenate([p["value/fc.weight"],
                                                                 np.ones(1, np.float16)])), m),
                          "fc.weight", "wrong number of values"),
    "mask sent up": (lambda p, m: (_replace(p, "mask/fc.weight", pack_mask(m["fc.weight"])), m),
                     "fc.weight", "unknown entry kind"),
    "dense for masked": (lambda p, m: ({**_drop(p, "value/fc.weight"),
                                        "dense/fc.weight": np.zeros((5, 13), np.float16)}, m),
                         "fc.weight", "expected"),
}


@pytest.mark.parametrize("case", sorted(UP_CASES))
def test_decode_up_rejects(case):
    corrupt, tensor, match = UP_CASES[case]
    payload, template, masks = up()
    payload, masks = corrupt(payload, masks)
    assert_wire_error(decode_up, payload, template, masks, CLIENT, tensor=tensor, match=match)


# ----------------------------------------------------------------------------- bad sparse input

SPARSE_TEMPLATE = {"w": ((2, 3), np.dtype(np.float32))}


def sparse_payload(index, values):
    return {"index/w": np.asarray(index), "value/w": np.asarray(values)}


F32 = np.float32
SPARSE_CASES = {
    "out-of-range index": (sparse_payload([0, 6], np.ones(2, F32)), "out of range"),
    "negative index": (sparse_payload(np.array([-1, 2], np.int32), np.ones(2, F32)),
                       "out of range"),
    "duplicate index": (sparse_payload([4, 1, 4], np.ones(3, F32)), "duplicate index 4"),
    "length mismatch": (sparse_payload([0, 1, 2], np.ones(2, F32)), "length mismatch"),
    "float index": (sparse_payload(np.array([0.0, 1.0]), np.ones(2, F32)), "integer"),
    "value dtype": (sparse_payload([0, 1], np.ones(2, np.float64)), "dtype mismatch"),
    "missing values": ({"index/w": np.array([0])}, "expected"),
    "missing tensor": ({}, "missing"),
    "unknown name": ({**sparse_payload([0], np.ones(1, F32)), "index/v": np.array([0])},
                     "unknown tensor"),
    "unknown kind": ({**sparse_payload([0], np.ones(1, F32)), "mask/w": np.zeros(1, np.uint8)},
                     "unknown entry kind"),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_decode_sparse_rejects(case):
    payload, match = SPARSE_CASES[case]
    tensor = "v" if case == "unknown name" else "w"
    assert_wire_error(decode_sparse, payload, SPARSE_TEMPLATE, CLIENT, tensor=tensor, match=match)


def test_encode_sparse_validates_against_template():
    assert_wire_error(encode_sparse, {"w": (np.array([6]), np.ones(1, F32))}, SPARSE_TEMPLATE,
                      tensor="w", client="local", match="out of range")


# ----------------------------------------------------------------------------- binary checks


def test_check_binary_accepts_bool_and_01_integers():
    np.testing.assert_array_equal(check_binary(np.array([0, 1, 1], np.uint8), "t", CLIENT),
                                  [False, True, True])
    assert check_binary(np.array([True, False]), "t", CLIENT).dtype == np.bool_


@pytest.mark.parametrize("bad", [np.array([0, 2]), np.array([0.5, 1.0]), np.array([0.0, 1.0]),
                                 np.array([-1, 0])])
def test_check_binary_rejects_non_binary(bad):
    assert_wire_error(check_binary, bad, "layer1.0.conv1.weight", CLIENT,
                      tensor="layer1.0.conv1.weight", match="non-binary mask")


def test_encode_rejects_bad_masks():
    state, masks = make_state()
    assert_wire_error(encode_down, state, {**masks, "fc.weight": masks["fc.weight"].T},
                      tensor="fc.weight", client="server", match="shape mismatch")
    assert_wire_error(encode_down, state, {"bn.num_batches_tracked": np.array(True)},
                      tensor="bn.num_batches_tracked", client="server", match="floating")
    assert_wire_error(encode_up, state, {"ghost": np.ones(1, bool)}, tensor="ghost",
                      client="local", match="template")
