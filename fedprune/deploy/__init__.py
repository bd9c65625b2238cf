"""Deployment helpers without Flower: certificates and keys (``pki``) and the settings a
client node owns (``node``)."""
