import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def chat_tokenizer():
    return tiny.make_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def plain_tokenizer():
    return tiny.make_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (thread start-up costs more than their matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
