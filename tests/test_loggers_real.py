"""--log tensorboard and --log wandb with the real packages (the ``log`` extra; ``dev`` holds them): what a
run writes is read back with their own readers and holds the rows of metrics.jsonl and the run's config
(config.yaml). W&B runs offline, in the test's folder; nothing reaches the network. Each test is skipped
where its package does not import; tests/test_loggers.py checks what metaphi hands them with stand-ins."""
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import yaml

from metaphi.cli import main
from test_loggers import RUN, jsonl
from tiny import install_tiny

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_the_logger_packages_are_imported_only_when_asked(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {TESTS!r})
import metaphi, metaphi.cli, metaphi.loggers
from metaphi.tasks import registry
from tiny import tiny_benchmark
registry.BENCHMARKS["tiny"] = lambda options: tiny_benchmark()
assert metaphi.cli.main(["run", *{RUN!r}, "--iterations", "2", "--log", "csv", "--out", {str(tmp_path / "o")!r}]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb", "tensorboardX")
             or m.startswith("torch.utils.tensorboard")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "o" / "metrics.csv").is_file()


def config_lines(out):
    """The lines of the text TensorBoardLogger attaches: the resolved config, as config.yaml has it."""
    return sorted(f"    {k}: {v}" for k, v in yaml.safe_load(open(out / "config.yaml")).items())


def test_tensorboard_event_files_hold_the_rows_of_metrics_jsonl_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="--log tensorboard needs the tensorboard package (the log extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", *RUN, "--iterations", "3", "--log", "tensorboard", "--out", str(out)]) == 0
    first_config = config_lines(out)
    assert main(["run", *RUN, "--iterations", "5", "--log", "tensorboard", "--out", str(out), "--resume"]) == 0
    expected = jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in expected] == [1, 2, 3, 4, 5]

    # every event file of the folder, nothing purged: a step written twice would show twice
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0},
                              purge_orphaned_data=False)
    events.Reload()
    tags = {k for r in expected for k in r if k != "iteration"}
    assert set(events.Tags()["scalars"]) == tags == {"loss", "accuracy", "seconds", "val"}
    for tag in tags:
        rows = [r for r in expected if tag in r]
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [r["iteration"] for r in rows], tag
        assert [e.value for e in scalars] == [np.float32(r[tag]) for r in rows], tag  # float32, as written

    # the config as a text summary (TensorBoard's Text tab), one per run: the resumed run's is its own
    assert events.Tags()["tensors"] == ["config/text_summary"]
    assert events.SummaryMetadata("config/text_summary").plugin_data.plugin_name == "text"
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("config/text_summary")]
    assert [sorted(t.split("\n")) for t in texts] == [first_config, config_lines(out)]
    assert "    iterations: 3" in texts[0] and "    iterations: 5" in texts[1] and "    algorithm: maml" in texts[1]


def wandb_records(path):
    """The Records (wandb.proto.wandb_internal_pb2) of an offline run file ``run-ID.wandb``: a 7-byte
    header (':W&B', 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (each a 7-byte header:
    crc32, length, type 1 full / 2 first / 3 middle / 4 last; a block's tail shorter than a header is
    zero padding). wandb keeps no Python reader of its own since its writer moved to wandb-core."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, i, chunk = 32768, 7, b""
    while i + 7 <= len(data):
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if block - i % block < 7 or (kind == 0 and length == 0):  # the padded rest of a block
            i += block - i % block
            continue
        chunk, i = chunk + data[i + 7:i + 7 + length], i + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def key(item):
    """A history or summary item's key: ``key``, or (as wandb-core writes them) ``nested_key`` joined."""
    return item.key or "/".join(item.nested_key)


def wandb_run(folder):
    """(the run record, the history rows as {iteration, logged keys}, the last summary) of an offline run."""
    [path] = glob.glob(os.path.join(folder, "run-*.wandb"))
    run, history, summary = None, [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {key(item): json.loads(item.value_json) for item in record.history.item}
            history.append({"iteration": record.history.step.num,
                            **{k: v for k, v in items.items() if not k.startswith("_")}})
        elif kind == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update
                            if not key(item).startswith("_")})
    return run, history, summary


def test_wandb_offline_run_holds_the_rows_of_metrics_jsonl_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="--log wandb needs the wandb package (the log extra)")
    import wandb

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    install_tiny(monkeypatch)
    out = tmp_path / "run"
    try:
        assert main(["run", *RUN, "--iterations", "3", "--log", "wandb", "--out", str(out)]) == 0
        first_config = yaml.safe_load(open(out / "config.yaml"))
        assert main(["run", *RUN, "--iterations", "5", "--log", "wandb", "--out", str(out), "--resume"]) == 0
    finally:
        wandb.teardown()  # the wandb-core service this process started
    expected = jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in expected] == [1, 2, 3, 4, 5]

    # metaphi gives wandb.init dir=OUT: the offline runs are in OUT/wandb (WANDB_DIR does not apply)
    folders = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert folders and not glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    # the resumed run continued the first W&B run: one id (kept in OUT), not one per process
    run_id = (out / "wandb-run-id").read_text().strip()
    assert len(folders) == 2 and all(f.endswith("-" + run_id) for f in folders)
    runs = sorted((wandb_run(folder) for folder in folders), key=lambda r: r[0].start_time.ToNanoseconds())
    for run, _, _ in runs:
        assert run.project == "metaphi" and run.display_name == "run"
    configs = [{item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
               for run, _, _ in runs]
    assert configs[0] == first_config and configs[-1] == yaml.safe_load(open(out / "config.yaml"))
    assert configs[-1]["iterations"] == 5 and configs[-1]["resume"] is True

    # the history rows, all runs together: exactly metrics.jsonl (JSON floats, so exactly), no step twice
    assert [row for _, history, _ in runs for row in history] == expected
    # the summary: each key's last value
    assert runs[-1][2] == {k: v for r in expected[3:] for k, v in r.items() if k != "iteration"}
