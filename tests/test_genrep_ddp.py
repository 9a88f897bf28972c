"""GenRep alignment under DDP: two gloo processes give the single-process update of the whole batch."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from genperc.training.combiners import AlignConfig, GradientAlignmentCombiner

SCRIPT = r"""
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
from toy_align import Toy, batch, losses
from genperc.training.combiners import AlignConfig, GradientAlignmentCombiner
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
m = Toy()
x, y = batch()
n = x.shape[0] // w
comb = GradientAlignmentCombiner(m.parameters(), AlignConfig(mode=sys.argv[3]), aligned=list(m.shared.parameters()))
comb.backward(losses(m, x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]))
save_file({k: p.grad.contiguous() for k, p in m.named_parameters()}, f"{sys.argv[1]}/grads-{r}.safetensors")
dist.destroy_process_group()
"""

TOY = r"""
import torch

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.shared = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(6, 3)
        self.gen = torch.nn.Linear(6, 4)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

def losses(m, x, y):
    h = torch.tanh(m.shared(x))
    return {"perception": {"disc": torch.nn.functional.cross_entropy(m.head(h), y)},
            "generation": {"simple": (m.gen(h) - x).pow(2).mean()}}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_alignment_equals_single_process(tmp_path):
    (tmp_path / "toy_align.py").write_text(TOY)
    script = tmp_path / "ddp_align.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.path.insert(0, str(tmp_path))
    try:
        from toy_align import Toy, batch, losses
    finally:
        sys.path.remove(str(tmp_path))
    for mode in ("symmetric", "pcgrad"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script), str(tmp_path), str(tmp_path), mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        g0, g1 = (load_file(str(tmp_path / f"grads-{r}.safetensors")) for r in range(2))
        m = Toy()
        x, y = batch()
        comb = GradientAlignmentCombiner(m.parameters(), AlignConfig(mode=mode), aligned=list(m.shared.parameters()))
        comb.backward(losses(m, x, y))
        assert comb.last["cos"] < 0.99  # the two losses do not point the same way
        for k, p in m.named_parameters():
            assert torch.equal(g0[k], g1[k]), k  # the ranks agree bit for bit
            assert torch.allclose(g0[k], p.grad, atol=1e-6), (mode, k)  # and equal the whole-batch update
        if mode != "symmetric":
            continue
        # aligning per rank and averaging would differ (the projections are nonlinear)
        per_rank = []
        for r in range(2):
            mr = Toy()
            c = GradientAlignmentCombiner(mr.parameters(), AlignConfig(mode=mode), aligned=list(mr.shared.parameters()))
            c.backward(losses(mr, x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]))
            per_rank.append(mr.shared.weight.grad)
        assert not torch.allclose((per_rank[0] + per_rank[1]) / 2, m.shared.weight.grad, atol=1e-6)
