"""Fixtures of the evaluation tests."""

import pytest


class ByteTok:
    """One token per UTF-8 byte, EOS = 256: scores are hand-computable on it."""

    eos_id = 256

    def encode(self, s):
        return list(s.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


@pytest.fixture
def byte_tok():
    return ByteTok()
