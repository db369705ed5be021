"""The kernel benchmark's command line (scripts/kernel_bench) without a GPU: rows listed and
selected by op, unknown ops refused by name, every sweep reachable from `tune`."""
import pytest

pytest.importorskip("triton", reason="triton is not installed: the benchmark needs it")

from scripts.kernel_bench import cases, tune  # noqa: E402
from scripts.kernel_bench.__main__ import _parser, main  # noqa: E402


def test_every_op_has_rows_and_a_title():
    ops = {c.op for c in cases.CASES}
    assert ops == set(cases.TITLES)
    assert all(any(c.quick for c in cases.CASES if c.op == op) for op in ops)


def test_rows_select_by_op_and_quick():
    assert len(cases.select([], quick=False)) == len(cases.CASES)
    mla = cases.select(["mla_decode", "fused_moe"], quick=False)
    assert {c.op for c in mla} == {"mla_decode", "fused_moe"}
    quick = cases.select(["mla_decode", "fused_moe"], quick=True)
    assert 0 < len(quick) < len(mla) and all(c.quick for c in quick)


def test_run_list_and_unknown_rows(capsys):
    assert main(["run", "--list", "--rows", "sample,mla_prefill"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "mla_prefill" in out and "decode_attention" not in out
    with pytest.raises(SystemExit, match="unknown rows \\['nope'\\]; known: decode_attention"):
        main(["run", "--rows", "sample,nope"])


@pytest.mark.parametrize("argv,family,want", [
    (["tune", "attention", "--gqa-decode"], "attention", (True, False)),
    (["tune", "attention", "--mla-only"], "attention", (False, True)),
    (["tune", "mla", "--top", "3", "--no-generic"], "mla", (3, False)),
    (["tune", "mla"], "mla", (6, True)),
    (["tune", "stages"], "stages", ()), (["tune", "prefill", "--no-tiles"], "prefill", (False,)),
    (["tune", "moe"], "moe", ()), (["tune", "moe-decode"], "moe_decode", ()),
    (["tune", "splits"], "splits", ())])
def test_tune_options_reach_the_sweep(monkeypatch, argv, family, want):
    """The former environment switches (TUNE_GQA_DECODE, TUNE_MLA_TOP, TUNE_MLA_GENERIC,
    TUNE_PREFILL_TILES, TUNE_MOE) are options of `tune <family>`."""
    calls = []
    monkeypatch.setattr(tune, family, lambda ceil, *a: calls.append((ceil, a)))
    args = _parser().parse_args(argv)
    args.sweep(args, "ceilings")
    assert calls == [("ceilings", want)]
    with pytest.raises(SystemExit):
        _parser().parse_args(["tune", "nosuch"])
