"""benchmarks/full_size_smoke.py, the command a lent GPU machine runs, works here: every entry, one
iteration at reduced size (ResNet-18, small images), on the CPU."""
import json

from benchmarks import full_size_smoke


def test_every_entry_runs_one_reduced_step(tmp_path, capsys):
    results = full_size_smoke.main(["--reduced", "--steps", "1", "--workers", "0", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == results  # the last line is the JSON object
    assert set(results) == set(full_size_smoke.ENTRIES)
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["step_s"] > 0 and 0 <= r["data_share"] <= 1 and r["peak_mem_gib"] > 0, (name, r)
        assert r["device"] == "cpu" and r["batch"] == 2 and r["steps"] >= 1, (name, r)


def test_a_failing_entry_is_reported_and_exits_1(tmp_path, capsys, monkeypatch):
    real = full_size_smoke.plan

    def broken(name, *args, **kwargs):  # a flag the script does not know: its stage exits 2
        stages, metrics, batch = real(name, *args, **kwargs)
        return [(stages[0][0], stages[0][1] + ["--no-such-flag"])], metrics, batch

    monkeypatch.setattr(full_size_smoke, "plan", broken)
    try:
        full_size_smoke.main(["--reduced", "--steps", "1", "--workers", "0", "--only", "soco", "--out", str(tmp_path)])
    except SystemExit as e:
        assert e.code == 1
    else:
        raise AssertionError("a failed entry must exit 1")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "--no-such-flag" in result["soco"]["error"] and "exited 2" in result["soco"]["error"]
