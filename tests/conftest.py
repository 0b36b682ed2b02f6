import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "LastFM" / "LastFM.txt").exists():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from llmd4rec.testing import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tokenizer():
    from llmd4rec.testing import tiny_tokenizer

    return tiny_tokenizer()
