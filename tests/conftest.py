import sys
from pathlib import Path

import pytest

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
