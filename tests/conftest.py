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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Sampling steps of the served page: a round streams this many updates.
PAGE_STEPS = 4


@pytest.fixture(scope="module")
def served_page(referring_run):
    """`genperc serve`'s page for the tiny referring run (PAGE_STEPS steps), on 127.0.0.1: (run, url)."""
    import torch

    from genperc.inference import load_run
    from genperc.interactive import web

    torch.set_num_threads(1)
    run = load_run(referring_run.run_dir, text_encoder=referring_run.text_encoder,
                   overrides=[f"sample.steps={PAGE_STEPS}"])
    demo = web.build_app(run, split="test")
    _, url, share = web.launch(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True, quiet=True)
    assert share is None and url.startswith("http://127.0.0.1:")
    yield run, url
    demo.close()
