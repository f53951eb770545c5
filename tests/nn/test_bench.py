"""bench-attention: the memory accounting counts what it should; the verb writes JSON lines and a PNG."""

from __future__ import annotations

import json

import torch

from lmforge.cli import main
from lmforge.nn.bench import TensorMemory, bench_attention, summary


def test_tensor_memory_tracks_the_peak_of_live_storage():
    x = torch.randn(256, 256)  # made before: not counted
    with TensorMemory() as mem:
        a = x @ x  # 256 KiB
        b = a @ a  # 256 KiB, both alive
        del a
        c = b + 1  # a was freed: still 512 KiB at most
        c.add_(1)  # in place: no new storage
        v = c.view(-1)  # a view: no new storage
        assert mem.current == 2 * 256 * 256 * 4
        del b, c, v
    assert mem.peak == 2 * 256 * 256 * 4
    assert mem.current == 0


def test_quadratic_and_linear_memory_are_told_apart():
    recs = bench_attention([2048, 4096], ["reference", "chunked"], heads=1, head_dim=16, repeats=1, progress=False)
    peak = {(r["kind"], r["T"]): r["peak_tensor_bytes"] for r in recs}
    assert peak["reference", 4096] > 3.5 * peak["reference", 2048] > 3.5 * 2 * 2048 * 2048 * 4  # T x T matrices
    assert peak["chunked", 4096] < 1.6 * peak["chunked", 2048]  # tiles + O(T)
    assert peak["chunked", 4096] < peak["reference", 4096] / 10


def test_cli_writes_json_lines_and_a_plot(tmp_path, capsys):
    rc = main(["bench-attention", "--lengths", "1024,2048", "--kinds", "chunked,sparse-local-512,linear-elu",
               "--heads", "1", "--head-dim", "16", "--repeats", "1", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "attention.jsonl").read_text().splitlines()]
    assert {(r["kind"], r["T"]) for r in lines} == {(k, T) for k in ("sdpa", "chunked", "sparse-local-512", "linear-elu")
                                                    for T in (1024, 2048)}  # fmt: skip
    assert all(r["time_s"] > 0 and "time_vs_sdpa" in r and r["peak_tensor_bytes"] > 0 for r in lines)
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    assert "chunked_memory_growth_per_doubling" in summary(lines)
    assert capsys.readouterr().out.count("\n") == len(lines) + 1


def test_unknown_kind_is_one_sentence(capsys):
    assert main(["bench-attention", "--kinds", "flash3", "--lengths", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown attention kind(s) flash3; choose from sdpa" in err
