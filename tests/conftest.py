import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def text_encoder():
    """The packaged MiniLM behind the embedding cache, loaded once per test process."""
    from genperc.models.text import CachedTextEncoder, MiniLMTextEncoder

    return CachedTextEncoder(MiniLMTextEncoder(max_length=8))


#: A tiny referring run (2 training steps on 16-px toy shapes) for the interactive tests.
TINY_REFERRING = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.steps=2",
                  "train.warmup_steps=1", "train.progress=false", "train.checkpoint_every=2",
                  "model.text_max_length=8", "sample.steps=3", "sample.sampler=ddim", "sample.text_scale=3.0",
                  "sample.image_scale=1.5", "data.options={size: 6}"]


@pytest.fixture(scope="session")
def referring_run(tmp_path_factory, text_encoder):
    """A loaded tiny referring run (see TINY_REFERRING); its directory is ``.run_dir``."""
    from genperc.config import load_config
    from genperc.data.toy import ToyShapes
    from genperc.inference import load_run
    from genperc.training.trainer import Trainer

    root = tmp_path_factory.mktemp("referring-run")
    Trainer(load_config("cpu-tiny", TINY_REFERRING), root / "run", train_source=ToyShapes(size=6, resolution=16),
            text_encoder=text_encoder).train()
    return load_run(root / "run", text_encoder=text_encoder)
