"""The benchmark scripts run in smoke mode and write well-formed result tables (not timings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import parse_markdown_table  # noqa: E402


# Seconds each smoke script may run: 3x the longest wall time measured on the shared 2-core machine
# with about eight CPU-bound jobs beside it (memory_speed 59-79 s, quality 102-115 s, premise 40-54 s;
# CPU time 15 s, 18 s, 13 s). One limit per script, so a slow one cannot take the others down with it.
SMOKE_SECONDS = {"memory_speed.py": 240, "quality.py": 360, "premise.py": 180, "export_speed.py": 240,
                 "sparse_passes.py": 180}
PYTEST_SLACK = 60  # the test's own limit on top: interpreter start, parsing the tables


def run_smoke(script: str, out: Path, *extra: str) -> Path:
    """Run one benchmark script in smoke mode into `out`; its stderr tail on failure or time-out."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_SECONDS[script])
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        pytest.fail(f"{script} --smoke ran past {SMOKE_SECONDS[script]} s; stderr: {(stderr or '')[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every '## heading' followed by a table, parsed."""
    found = {}
    for section in text.split("\n## ")[1:]:
        title = section.splitlines()[0].strip()
        if "|" in section:
            found[title] = parse_markdown_table(section)
    return found


@pytest.mark.timeout(SMOKE_SECONDS["memory_speed.py"] + PYTEST_SLACK)
def test_memory_speed_tables(tmp_path):
    smoke_out = run_smoke("memory_speed.py", tmp_path)
    text = (smoke_out / "memory_speed.md").read_text()
    assert "SMOKE MODE" in text
    found = tables(text)
    train = next(v for k, v in found.items() if k.startswith("Training step"))
    columns, rows = train
    for column in ("method", "trainable", "optimizer", "grad ckpt", "batch", "peak RSS GiB", "median step s",
                   "peak / LoRA", "step time / LoRA"):
        assert column in columns
    assert all(len(row) == len(columns) for row in rows)
    methods = {row[0].split()[0] for row in rows}
    assert {"sara", "lora", "full", "locon", "shira"} <= methods
    lora = next(row for row in rows if row[0].startswith("lora") and row[3] == "adamw8bit")
    assert float(lora[columns.index("peak / LoRA")]) == 1.0
    sara = next(row for row in rows if row[0] == "sara")
    assert sara[columns.index("trainable")] == "5,000"  # the SaRA budget is exact
    for row in rows:
        assert float(row[columns.index("peak RSS GiB")]) > 0
        assert float(row[columns.index("median step s")]) > 0
    overhead_cols, overhead = next(v for k, v in found.items() if k.startswith("Per-step overhead"))
    assert {row[0].split()[0] for row in overhead} == {"frozen", "sara_x", "sara", "lora"}
    assert float(next(r for r in overhead if r[0] == "frozen")[overhead_cols.index("time / frozen")]) == 1.0
    export_cols, export = next(v for k, v in found.items() if k.startswith("LoRA export"))
    assert export and export[0][export_cols.index("exit status")] == "0"
    assert "Configurations that failed" not in text
    records = json.loads((smoke_out / "memory_speed.json").read_text())["records"]
    assert not [r for r in records if "error" in r]
    assert (smoke_out / "memory_speed.png").stat().st_size > 0


@pytest.mark.timeout(SMOKE_SECONDS["quality.py"] + PYTEST_SLACK)
def test_quality_tables(tmp_path):
    smoke_out = run_smoke("quality.py", tmp_path)
    text = (smoke_out / "quality.md").read_text()
    found = tables(text)
    columns, rows = found["Results"]
    for column in ("method", "lr", "trainable", "seeds", "learning-set loss ↓ (mean)", "forgetting Δold ↓ (mean)",
                   "sample acc"):
        assert column in columns
    assert [row[0].split()[0] for row in rows] == ["sara", "sara_plain", "lora", "locon", "full"]
    for row in rows:
        float(row[columns.index("learning-set loss ↓ (mean)")])
        float(row[columns.index("forgetting Δold ↓ (mean)")])
    front_columns, front = next(v for k, v in found.items() if k.startswith("Learning vs forgetting"))
    assert len(front) == len(rows)
    points = {row[0] for row in front}
    for row in front:
        beaten_by = row[front_columns.index("beaten on both by")]
        assert beaten_by == "not beaten" or all(p in points for p in beaten_by.split("; "))
    records = json.loads((smoke_out / "quality.json").read_text())["records"]
    assert all(r["old_rows_unchanged"] for r in records)  # class-embedding rows 0-7 stay frozen
    assert (smoke_out / "quality_samples.png").stat().st_size > 0
    assert (smoke_out / "quality.png").stat().st_size > 0


@pytest.mark.timeout(2 * SMOKE_SECONDS["quality.py"] + PYTEST_SLACK)
def test_quality_style_task_with_selection_modes(tmp_path):
    """The second task kind, the selection modes and the paper's lr rule as a sweep point."""
    smoke_out = run_smoke("quality.py", tmp_path, "--task", "style", "--methods", "sara,sara_grad,sara_random",
                          "--lr", "sara=auto")
    columns, rows = tables((smoke_out / "quality_style.md").read_text())["Results"]
    assert [row[0] for row in rows] == ["sara", "sara_grad", "sara_random"]
    assert rows[0][columns.index("lr")].startswith("auto = ")
    assert rows[0][columns.index("frozen at the end")].endswith("%")
    records = json.loads((smoke_out / "quality_style.json").read_text())["records"]
    assert {r["task"] for r in records} == {"style"} and all(r["old_rows_unchanged"] for r in records)
    # runs done in parallel into their own stems join one results file
    run_smoke("quality.py", tmp_path, "--task", "style", "--methods", "sara_random", "--lr", "sara_random=1e-3",
              "--stem", "joined", "--merge", "quality_style")
    joined = json.loads((smoke_out / "joined.json").read_text())["records"]
    assert sorted((r["method"], str(r["lr"])) for r in joined) == sorted(
        [(r["method"], str(r["lr"])) for r in records] + [("sara_random", "0.001")])
    assert [row[0] for row in tables((smoke_out / "joined.md").read_text())["Results"][1]].count("sara_random") == 2


@pytest.mark.timeout(SMOKE_SECONDS["premise.py"] + PYTEST_SLACK)
def test_premise_table(tmp_path):
    smoke_out = run_smoke("premise.py", tmp_path)
    text = (smoke_out / "premise.md").read_text()
    columns, rows = parse_markdown_table(text.split("Base loss")[1])
    assert columns[:3] == ["fraction zeroed", "entries zeroed", "threshold"]
    assert [row[0] for row in rows] == ["1%", "5%"]
    data = json.loads((smoke_out / "premise.json").read_text())
    for record in data["records"]:
        assert record["zeroed"] == record["count"]  # exact-count threshold (no ties in fp32 random init)
    assert (smoke_out / "premise.png").stat().st_size > 0


@pytest.mark.timeout(SMOKE_SECONDS["export_speed.py"] + PYTEST_SLACK)
def test_export_speed_table(tmp_path):
    run_smoke("export_speed.py", tmp_path)
    columns, rows = parse_markdown_table((tmp_path / "export_speed.md").read_text())
    assert [row[columns.index("command")].split()[1] for row in rows] == ["to-lora", "to-diff", "merge", "inspect"]
    assert all(row[columns.index("exit")] == "0" for row in rows)


@pytest.mark.timeout(SMOKE_SECONDS["sparse_passes.py"] + PYTEST_SLACK)
def test_sparse_passes_records(tmp_path):
    out = tmp_path / "sparse_passes.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sparse_passes.py"), "--arch", "tiny",
                           "--budgets", "5k", "--code", str(REPO), "--steps", "1", "--out", str(out)],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=SMOKE_SECONDS["sparse_passes.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["budget"] for r in records] == [0, 5000]
    assert records[1]["selected"] == 5000 and records[1]["sara_network"] == str(REPO / "sara_network")
