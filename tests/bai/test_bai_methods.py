"""Merge methods against tensors computed by hand."""

import math

import pytest
import torch

from bai import methods

B = torch.tensor([1.0, -2.0, 0.5, 4.0])
X1 = torch.tensor([2.0, -1.0, 0.5, 3.0])     # delta1 = [ 1,  1, 0, -1]
X2 = torch.tensor([0.0, -4.0, 1.5, 4.5])     # delta2 = [-1, -2, 1, 0.5]


def test_linear_and_bai():
    assert torch.equal(methods.linear([X1, X2], [0.25, 0.75]), torch.tensor([0.5, -3.25, 1.25, 4.125]))
    # stage 1: 0.5*X1 + 0.5*X2 = [1, -2.5, 1, 3.75]; stage 2 with alpha 0.2 on the base
    want = torch.tensor([0.2 * 1 + 0.8 * 1, 0.2 * -2 + 0.8 * -2.5, 0.2 * 0.5 + 0.8 * 1, 0.2 * 4 + 0.8 * 3.75])
    assert torch.allclose(methods.bai(B, [X1, X2], [0.5, 0.5], 0.2), want)
    outs = [o.clone() for o in methods.bai_sweep(B.clone(), [X1, X2], [0.5, 0.5], [0.0, 0.2, 1.0])]
    assert torch.allclose(outs[0], torch.tensor([1, -2.5, 1, 3.75]))
    assert torch.allclose(outs[1], want)
    assert torch.allclose(outs[2], B)


def test_linear_out_is_in_place():
    acc = torch.empty(4)
    assert methods.linear([X1, X2], [0.5, 0.5], out=acc) is acc


def test_task_arithmetic():
    # base + 0.5 * (1.0*delta1 + 0.5*delta2) = B + 0.5*[0.5, 0, 0.5, -0.75]
    got = methods.task_arithmetic(B, [X1, X2], [1.0, 0.5], lam=0.5)
    assert torch.allclose(got, torch.tensor([1.25, -2.0, 0.75, 3.625]))


def test_ties():
    # density 0.5 keeps 2 of 4 entries per task vector:
    #   delta1 = [1, 1, 0, -1] -> top-2 by |.|, ties broken by topk; use distinct magnitudes instead
    b = torch.zeros(4)
    d1 = torch.tensor([3.0, -1.0, 0.2, -2.0])   # keep 3, -2
    d2 = torch.tensor([-1.0, 4.0, 0.1, -5.0])   # keep 4, -5
    # weights 1,1: sign of sum: [3, 4, 0, -7] -> +, +, + (zero counts +), -
    # agree: e0: d1 (3>0) yes, d2 pruned -> 3/1; e1: d2 -> 4; e2: nobody -> 0; e3: both -> (-2-5)/2
    got = methods.ties(b, [d1, d2], [1.0, 1.0], density=0.5)
    assert torch.allclose(got, torch.tensor([3.0, 4.0, 0.0, -3.5]))
    # weights 3, 1: e3 weighted mean (3*-2 + 1*-5)/4; lambda 2 doubles it
    got = methods.ties(b, [d1, d2], [3.0, 1.0], density=0.5, lam=2.0)
    assert torch.allclose(got, 2 * torch.tensor([9 / 3, 4 / 1, 0.0, -11 / 4]))


def test_ties_sign_election_drops_minority():
    b = torch.zeros(1)
    got = methods.ties(b, [torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([3.0])], [1, 1, 1], density=1.0)
    assert torch.allclose(got, torch.tensor([2.5]))       # -1 disagrees with the elected +


def test_dare_rescales_by_density():
    g = torch.Generator().manual_seed(0)
    delta = torch.ones(10000)
    got = methods.dare_mask(delta, 0.25, g)
    kept = got != 0
    assert torch.all(got[kept] == 4.0)                    # 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    # density 1 keeps everything: dare_linear becomes task arithmetic
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert torch.allclose(methods.dare_linear(B, [X1, X2], [1.0, 0.5], 1.0, gens, lam=0.5),
                          methods.task_arithmetic(B, [X1, X2], [1.0, 0.5], lam=0.5))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert torch.allclose(methods.dare_ties(B, [X1, X2], [1.0, 1.0], 1.0, gens),
                          methods.ties(B, [X1, X2], [1.0, 1.0], 1.0))


def test_slerp():
    x0, x1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    got = methods.slerp(x0, x1, 0.5)
    # theta = pi/2: sin(pi/4)/1 * x0 + sin(pi/4)/1 * x1
    s = math.sin(math.pi / 4)
    assert torch.allclose(got, torch.tensor([s, 2 * s]))
    assert torch.allclose(methods.slerp(x0, x1, 0.0), x0)
    assert torch.allclose(methods.slerp(x0, x1, 1.0), x1)
    # near-parallel tensors fall back to linear interpolation
    y = torch.tensor([2.0, 1e-6])
    assert torch.allclose(methods.slerp(x0, y, 0.25), 0.75 * x0 + 0.25 * y)


def test_methods_import_no_engines():
    import subprocess
    import sys

    code = ("import sys, bai.methods; bad = [m for m in ('ray', 'deepspeed', 'vllm', 'megatron') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
