import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def text_encoder():
    """The packaged MiniLM behind the embedding cache, loaded once per test process."""
    from genperc.models.text import CachedTextEncoder, MiniLMTextEncoder

    return CachedTextEncoder(MiniLMTextEncoder(max_length=8))
