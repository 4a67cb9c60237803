"""Masking ops: the counter-based RNG, random_permutation, random_masking and the keep count.

Every backend (Triton through the interpreter on CPU, csrc when built) is compared with the
plain-PyTorch references, and the references with the official MAE's ``random_masking`` (the
peer, ``benchmarks/peers/official_mae.py``) fed the same noise. Index results must be identical.
The Triton launcher's buffers are poisoned and lie between poisoned guard bands (see
``fastmim.testing.guarded_allocations``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmim import ops
from fastmim.kernels import masking as kernels
from fastmim.ops.masking import masking_noise_reference
from fastmim.testing import backend_devices, count_calls, guarded_allocations, is_poison, kernel_devices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers.official_mae import MaskedAutoencoderViT as Official  # noqa: E402

DEVICES = kernel_devices()
RATIOS = [0.0, 0.5, 0.75, 0.9]


@pytest.fixture(autouse=True)
def triton_calls():
    """Guards the Triton launcher's allocations; yields its calls."""
    with guarded_allocations(kernels), count_calls(kernels, {"random_masking_forward": "random_masking_forward"}) \
            as calls:
        yield calls


def test_launcher_buffers_are_poisoned():
    for dtype in (torch.float32, torch.int64):
        t = kernels.torch.empty((3, 5), dtype=dtype, device="cpu")
        assert t.shape == (3, 5) and t.dtype == dtype and t.is_contiguous() and is_poison(t)


def _backends(device):
    """(backend, device) pairs to run: the reference on CPU, Triton on every kernel device."""
    return [("reference", "cpu")] + [("triton", d) for d in DEVICES]


# ----------------------------------------------------------------------------- RNG and masking


def _spec_noise(seed, b, i, offset=0):
    """The brief's RNG spec in plain Python integers."""
    M = 0xFFFFFFFF

    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M
        x ^= x >> 15
        x = (x * 0x2C1B3C6D) & M
        return x ^ (x >> 16)

    seed_key = mix32(seed & M) ^ mix32(((seed >> 32) & M) ^ 0x1B873593)
    row_key = mix32(seed_key ^ mix32((offset + b) & M))
    return mix32(row_key ^ ((i * 0x2545F491) & M))


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 2, 2**63 - 2])
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, 2**63 - 1])
def test_noise_follows_the_spec(seed, offset):
    noise = masking_noise_reference(seed, 3, 50, offset=offset)
    for b, i in [(0, 0), (1, 7), (2, 49), (2, 13)]:
        assert int(noise[b, i]) == _spec_noise(seed, b, i, offset)
    assert int(noise.min()) >= 0 and int(noise.max()) < 2**32


def _assert_permutation(ids):
    L = ids.shape[-1]
    assert torch.equal(ids.sort(dim=-1).values.cpu(), torch.arange(L).expand(ids.shape))


@pytest.mark.parametrize("batch,num_patches", [(1, 1), (3, 49), (2, 197), (1, 1024)])
def test_random_permutation_valid_and_equal_across_backends(batch, num_patches):
    ref_shuffle, ref_restore = ops.random_permutation_reference(batch, num_patches, seed=7)
    _assert_permutation(ref_shuffle)
    assert torch.equal(torch.gather(ref_shuffle, 1, ref_restore), torch.arange(num_patches).expand(batch, -1))
    for backend, device in _backends("cpu"):
        with ops.use_backend(backend):
            ids_shuffle, ids_restore = ops.random_permutation(batch, num_patches, seed=7, device=device)
        assert ids_shuffle.dtype == ids_restore.dtype == torch.int64
        assert ids_shuffle.device.type == torch.device(device).type
        assert torch.equal(ids_shuffle.cpu(), ref_shuffle), backend
        assert torch.equal(ids_restore.cpu(), ref_restore), backend


@pytest.mark.parametrize("mask_ratio", RATIOS)
@pytest.mark.parametrize("batch,num_patches", [(1, 49), (4, 197)])
def test_random_masking_matches_reference_and_official(mask_ratio, batch, num_patches):
    seed = 1234
    ref = ops.random_masking_reference(batch, num_patches, mask_ratio, seed=seed)
    K = int(num_patches * (1 - mask_ratio))
    assert ref.ids_keep.shape == (batch, K)
    # the official MAE's random_masking fed with the same noise gives the same keep set and mask
    x = torch.randn(batch, num_patches, 3)
    noise = masking_noise_reference(seed, batch, num_patches)
    # distinct values: the official (unstable) argsort has only one order to find
    assert all(row.unique().numel() == num_patches for row in noise)
    # the peer's random_masking reads nothing from the model: called on the class
    x_masked, mask, ids_restore = Official.random_masking(None, x, mask_ratio, noise)
    assert torch.equal(ref.ids_restore, ids_restore)
    assert torch.equal(ref.mask, mask)
    assert torch.equal(x[torch.arange(batch)[:, None], ref.ids_keep], x_masked)
    for backend, device in _backends("cpu"):
        with ops.use_backend(backend):
            out = ops.random_masking(batch, num_patches, mask_ratio, seed=seed, device=device)
        assert out.mask.dtype == torch.float32 and out.ids_keep.dtype == torch.int64
        for name in ("ids_keep", "ids_restore", "mask"):
            assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), (backend, name)
    _assert_permutation(ref.ids_restore)
    assert torch.equal(ref.mask.sum(1), torch.full((batch,), float(num_patches - K)))
    assert torch.equal(ref.mask.gather(1, ref.ids_keep), torch.zeros(batch, K))


def test_seed_reproducibility():
    for backend, device in _backends("cpu"):
        with ops.use_backend(backend):
            a = ops.random_masking(2, 49, 0.75, seed=99, device=device)
            b = ops.random_masking(2, 49, 0.75, seed=torch.tensor(99), device=device)
            c = ops.random_masking(2, 49, 0.75, seed=100, device=device)
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            d = ops.random_masking(2, 49, 0.75, generator=g1, device=device)
            e = ops.random_masking(2, 49, 0.75, generator=g2, device=device)
        assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
        assert not torch.equal(a.ids_restore, c.ids_restore)
        assert torch.equal(d.ids_restore, e.ids_restore)
    # samples of one batch get different permutations; nested keep sets across ratios
    assert not torch.equal(a.ids_restore[0], a.ids_restore[1])
    lo = ops.random_masking_reference(2, 49, 0.9, seed=99)
    assert torch.equal(a.ids_keep[:, : lo.ids_keep.shape[1]].cpu(), lo.ids_keep)


# (offset, rows of the offset-0 call it must reproduce): the sample counter is offset + b mod
# 2**32, so an offset near 2**32 (or one whose int64 sum wraps past 2**63) comes round to row 0.
OFFSET_CASES = [(1, [1, 2, 3, 4]), (7, [7, 8, 9, 10]), (2**32 - 2, [4294967294, 4294967295, 0, 1]),
                (2**63 - 2, [4294967294, 4294967295, 0, 1])]


def _rows(full, rows, high):
    """Rows of ``full`` (offset 0, ``len(full)`` rows); rows >= 2**32 - 2 come from ``high``."""
    return torch.stack([high[r - (2**32 - 2)] if r >= 2**32 - 2 else full[r] for r in rows])


@pytest.mark.parametrize("offset,rows", OFFSET_CASES)
def test_offset_gives_the_rows_of_a_larger_call(offset, rows):
    B, L, ratio, seed = 4, 49, 0.75, 2**40 + 3
    full = ops.random_masking_reference(11, L, ratio, seed=seed)
    # Rows 2**32 - 2 and 2**32 - 1 of the offset-0 stream, without materialising 2**32 rows.
    high = ops.random_masking_reference(2, L, ratio, seed=seed, offset=2**32 - 2)
    assert not torch.equal(high.ids_restore, full.ids_restore[:2])
    counts = [3, 0, 49, 17]
    full_shuffle = ops.random_permutation_reference(11, L, seed=seed)[0]
    high_shuffle = ops.random_permutation_reference(2, L, seed=seed, offset=2**32 - 2)[0]
    want_shuffle = _rows(full_shuffle, rows, high_shuffle)
    want = {name: _rows(getattr(full, name), rows, getattr(high, name)) for name in ("ids_keep", "ids_restore", "mask")}
    for backend, device in _backends("cpu"):
        for off in (offset, torch.tensor(offset), torch.tensor(offset, device=device)):
            with ops.use_backend(backend):
                m = ops.random_masking(B, L, ratio, seed=seed, offset=off, device=device)
                ids_shuffle, ids_restore = ops.random_permutation(B, L, seed=seed, offset=off, device=device)
                v = ops.random_masking(B, L, num_keep=counts, seed=seed, offset=off, device=device)
            for name, value in want.items():
                assert torch.equal(getattr(m, name).cpu(), value), (backend, off, name)
            assert torch.equal(ids_shuffle.cpu(), want_shuffle), (backend, off)
            assert torch.equal(ids_restore.cpu(), want["ids_restore"]), (backend, off)
            assert torch.equal(v.ids_restore.cpu(), want["ids_restore"]), (backend, off)
            assert torch.equal(v.ids_keep.cpu(), torch.cat([want_shuffle[b, :c] for b, c in enumerate(counts)]))
    # the references take the offset too, and an offset call is a slice of a larger one
    ref = ops.random_masking_reference(B, L, ratio, seed=seed, offset=offset)
    assert all(torch.equal(getattr(ref, name), value) for name, value in want.items())


def test_offset_splits_a_batch_across_processes():
    """Rank r of W holding rows [r * B, (r + 1) * B) passes offset r * B: the masks of the global
    batch do not depend on W."""
    B_global, L = 12, 25
    whole = ops.random_masking(B_global, L, 0.5, seed=9)
    for world in (2, 3, 4):
        local = B_global // world
        parts = [ops.random_masking(local, L, 0.5, seed=9, offset=r * local) for r in range(world)]
        assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
        assert torch.equal(torch.cat([p.ids_keep for p in parts]), whole.ids_keep)


def test_random_masking_uniform_first_position():
    # each patch is equally likely to be kept first: chi-square-ish bound on 4000 rows of L = 8
    ids = ops.random_masking_reference(4000, 8, num_keep=1, seed=3).ids_keep[:, 0]
    counts = torch.bincount(ids, minlength=8).float()
    assert (counts - 500).abs().max() < 120, counts


@pytest.mark.parametrize("counts_kind", ["list", "cpu_tensor"])
def test_random_masking_varlen(counts_kind):
    counts = [3, 0, 49, 17, 1]
    num_keep = counts if counts_kind == "list" else torch.tensor(counts, dtype=torch.int32)
    ref = ops.random_masking_reference(5, 49, num_keep=num_keep, seed=11)
    assert isinstance(ref, ops.PackedMasking)
    dense = ops.random_permutation_reference(5, 49, seed=11)[0]
    assert torch.equal(ref.ids_keep, torch.cat([dense[b, :c] for b, c in enumerate(counts)]))
    assert ref.cu_seqlens.tolist() == [0, 3, 3, 52, 69, 70] and ref.cu_seqlens.dtype == torch.int32
    assert ref.max_seqlen == 49
    assert ref.mask.sum(1).tolist() == [49 - c for c in counts]
    for backend, device in _backends("cpu"):
        with ops.use_backend(backend):
            out = ops.random_masking(5, 49, num_keep=num_keep, seed=11, device=device)
        assert out.max_seqlen == ref.max_seqlen
        for name in ("ids_keep", "cu_seqlens", "ids_restore", "mask"):
            assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), (backend, name)


def test_masking_from_a_mask_or_a_permutation_matches_random_masking():
    # the keep count's prefix of a permutation is random_masking's result; a mask given back
    # describes the same keep sets (in increasing patch order) and ranks them first
    ref = ops.random_masking_reference(3, 16, 0.75, seed=4)
    shuffle, restore = ops.random_permutation_reference(3, 16, seed=4)
    again = ops.masking_from_permutation(shuffle, restore, 4)
    assert all(torch.equal(a, b) for a, b in zip(again, ref, strict=True))
    for mask in (ref.mask, ref.mask.bool()):
        m = ops.masking_from_mask(mask)
        assert torch.equal(m.mask, ref.mask)
        assert torch.equal(m.ids_keep, ref.ids_keep.sort(dim=1).values)
        assert torch.equal(m.ids_restore.gather(1, m.ids_keep), torch.arange(4).expand(3, 4))
    varied = ref.mask.clone()
    varied[0, ref.ids_keep[0, 0]] = 1  # sample 0 keeps 3 patches, the others 4: packed
    packed = ops.masking_from_mask(varied)
    assert isinstance(packed, ops.PackedMasking) and packed.cu_seqlens.tolist() == [0, 3, 7, 11]
    assert torch.equal(packed.mask, varied) and packed.max_seqlen == 4
    with pytest.raises(ValueError, match="0 \\(kept\\) or 1 \\(removed\\)"):
        ops.masking_from_mask(ref.mask * 0.5)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_masking_arguments():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        ops.random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        ops.random_masking(2, 16, -0.1)
    with pytest.raises(ValueError, match="exactly one of mask_ratio and num_keep"):
        ops.random_masking(2, 16)
    with pytest.raises(ValueError, match="exactly one of mask_ratio and num_keep"):
        ops.random_masking(2, 16, 0.5, num_keep=3)
    with pytest.raises(ValueError, match=r"num_keep must be in \[0, num_patches=16\]"):
        ops.random_masking(2, 16, num_keep=17)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\)"):
        ops.random_masking(2, 16, num_keep=[1, 2, 3])
    with pytest.raises(ValueError, match="counts must be in"):
        ops.random_masking(2, 16, num_keep=[1, 20])
    with pytest.raises(TypeError, match="integer dtype"):
        ops.random_masking(2, 16, num_keep=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        ops.random_masking(2, 16, 0.5, seed=-1)
    with pytest.raises(ValueError, match="at most one of seed and generator"):
        ops.random_masking(2, 16, 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed tensor must be int64"):
        ops.random_permutation(2, 16, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="seed tensor must be int64"):
        ops.random_permutation(2, 16, seed=torch.tensor(5, dtype=torch.int32))
    # a tensor seed obeys the int seed's range: int64 covers [-2**63, 2**63), negatives are refused
    for seed in (torch.tensor(-5), torch.tensor([-(2**63)])):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -"):
            ops.random_masking(2, 16, 0.5, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -"):
            ops.random_permutation(2, 16, seed=seed)
    assert torch.equal(ops.random_permutation(2, 16, seed=torch.tensor(2**63 - 1))[0],
                       ops.random_permutation(2, 16, seed=2**63 - 1)[0])
    with pytest.raises(ValueError, match="num_patches must be >= 1"):
        ops.random_permutation(2, 0, seed=1)


BAD_OFFSETS = [  # (offset, error, message)
    (-1, ValueError, r"offset must be in \[0, 2\*\*63\), got -1"),
    (2**63, ValueError, r"offset must be in \[0, 2\*\*63\), got 9223372036854775808"),
    (torch.tensor(-3), ValueError, r"offset must be in \[0, 2\*\*63\), got -3"),
    (torch.tensor([-(2**63)]), ValueError, r"offset must be in \[0, 2\*\*63\), got -"),
    (torch.tensor(2, dtype=torch.int32), ValueError, "offset tensor must be int64 with one element, got torch.int32"),
    (torch.tensor([1, 2]), ValueError, r"offset tensor must be int64 with one element, got torch.int64 of shape "
                                       r"\(2,\)"),
    (torch.tensor(1.0), ValueError, "offset tensor must be int64 with one element, got torch.float32"),
    (True, TypeError, "offset must be an int or an int64 tensor, got bool"),
    (2.0, TypeError, "offset must be an int or an int64 tensor, got float"),
    (None, TypeError, "offset must be an int or an int64 tensor, got NoneType"),
]


@pytest.mark.parametrize("offset,error,message", BAD_OFFSETS)
def test_bad_offsets_raise(offset, error, message):
    calls = [lambda: ops.random_masking(2, 16, 0.5, seed=1, offset=offset),
             lambda: ops.random_masking(2, 16, num_keep=[3, 4], seed=1, offset=offset),
             lambda: ops.random_permutation(2, 16, seed=1, offset=offset),
             lambda: ops.random_masking_reference(2, 16, 0.5, seed=1, offset=offset),
             lambda: ops.random_permutation_reference(2, 16, seed=1, offset=offset),
             lambda: masking_noise_reference(1, 2, 16, offset=offset)]
    for backend in ("reference", "triton", "csrc"):
        with ops.use_backend(backend):
            for call in calls:
                with pytest.raises(error, match=message):
                    call()


# ----------------------------------------------------------------------------- properties
# Generated cases on every backend that runs here against the references: empty and
# single-sample batches, no kept patch, every patch kept, per-sample counts, huge offsets.
# Derandomized, so every run checks the same cases.

_PROPERTY_SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)


@st.composite
def _keep(draw, B, L, varlen):
    """Per-sample counts (varlen) or a keep count: often a mask ratio's, 0 and 0.95 among them."""
    ratio_keep = st.sampled_from([0.0, 0.95, 0.75]).map(lambda r: ops.num_keep_from_ratio(L, r))
    if varlen:
        return draw(st.lists(st.one_of(ratio_keep, st.integers(0, L)), min_size=B, max_size=B))
    return draw(st.one_of(ratio_keep, st.integers(0, L)))


@st.composite
def _masking_cases(draw):
    B, L = draw(st.integers(0, 4)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["ratio", "num_keep", "counts", "counts_tensor"]))
    if kind == "ratio":
        arg = {"mask_ratio": draw(st.one_of(st.sampled_from([0.0, 0.95]), st.floats(0.0, 0.95)))}
    elif kind == "num_keep":
        arg = {"num_keep": draw(st.integers(0, L))}
    else:
        counts = draw(_keep(B, L, varlen=True))
        dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        arg = {"num_keep": counts if kind == "counts" else torch.tensor(counts, dtype=dtype)}
    seed = draw(st.integers(0, 2**63 - 1))
    offset = draw(st.one_of(st.integers(0, 16), st.integers(0, 2**63 - 1)))
    return B, L, arg, seed, offset


@pytest.mark.parametrize("backend,device", backend_devices())
@_PROPERTY_SETTINGS
@given(case=_masking_cases())
def test_property_random_masking_and_permutation(backend, device, case):
    B, L, arg, seed, offset = case
    ref = ops.random_masking_reference(B, L, **arg, seed=seed, offset=offset)
    ref_shuffle, ref_restore = ops.random_permutation_reference(B, L, seed=seed, offset=offset)
    with ops.use_backend(backend):
        got = ops.random_masking(B, L, **arg, seed=seed, offset=offset, device=device)
        shuffle, restore = ops.random_permutation(B, L, seed=seed, offset=offset, device=device)
    assert type(got) is type(ref)
    for name, want in zip(ref._fields, ref, strict=True):
        value = getattr(got, name)
        assert value == want if name == "max_seqlen" else torch.equal(value.cpu(), want), name
    assert torch.equal(shuffle.cpu(), ref_shuffle) and torch.equal(restore.cpu(), ref_restore)
    # what the other ops rely on: permutation rows, the keep set a prefix of the shuffle, the mask
    _assert_permutation(ref_restore)
    counts = (ref.cu_seqlens.diff().long() if isinstance(ref, ops.PackedMasking)
              else torch.full((B,), ref.ids_keep.shape[1], dtype=torch.int64))
    assert torch.equal(ref.mask.sum(1), (L - counts).float())
    keep = torch.arange(L)[None, :] < counts[:, None]
    assert torch.equal(ref.ids_keep.flatten(), ref_shuffle[keep])
