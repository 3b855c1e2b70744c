"""User errors of every kind, from the user's side: one line ``error: where: what (what to do)`` on stderr, the exit
code, never a traceback. No services: closed ports stand for an unreachable broker or Redis."""

from __future__ import annotations

import gzip
import importlib.metadata
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.local_services import free_port


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


@pytest.mark.parametrize("args, line", [
    (["bench", "--engine-only", "--engine-batches", "64,x"],
     "error: bench --engine-batches: expected comma-separated whole numbers greater than 0, got '64,x' "
     "(see 'streamlabel bench --help')"),
    (["run", "--workers", "abc"],
     "error: run --workers: expected a whole number, got 'abc' (see 'streamlabel run --help')"),
    (["run", "--workers", "0"],
     "error: run --workers: must be greater than 0, got 0 (see 'streamlabel run --help')"),
    (["produce", "--count", "5", "--rate", "-5"],
     "error: produce --rate: must be greater than 0, got -5 (see 'streamlabel produce --help')"),
    (["produce", "--rate", "fast", "--count", "5"],
     "error: produce --rate: expected a number, got 'fast' (see 'streamlabel produce --help')"),
    (["produce", "--duration", "-1"],
     "error: produce --duration: must be greater than 0, got -1 (see 'streamlabel produce --help')"),
    (["produce", "--count", "5", "--duplicate-ratio", "1.5"],
     "error: produce --duplicate-ratio: must be between 0 and 1, got 1.5 (see 'streamlabel produce --help')"),
    (["produce", "--count", "5", "--profile", "sports"],
     "error: produce --profile: 'sports' is not one of 'support', 'news', 'mixed' (see 'streamlabel produce --help')"),
    (["produce", "--rate"],
     "error: produce: option '--rate' requires an argument (see 'streamlabel produce --help')"),
    (["replay", "x.jsonl", "--count", "0"],
     "error: replay --count: must be greater than 0, got 0 (see 'streamlabel replay --help')"),
    (["demo", "--events", "-3"],
     "error: demo --events: must be greater than 0, got -3 (see 'streamlabel demo --help')"),
    (["bench", "--delivery", "twice"],
     "error: bench --delivery: 'twice' is not one of 'at_least_once', 'exactly_once' (see 'streamlabel bench --help')"),
    (["alerts", "tail", "--count", "-1"],
     "error: alerts tail --count: must be greater than 0, got -1 (see 'streamlabel alerts tail --help')"),
    (["--bogus"], "error: streamlabel: no such option --bogus (see 'streamlabel --help')"),
    (["run", "--boot", "x"],
     "error: run: no such option --boot (did you mean --bootstrap? see 'streamlabel run --help')"),
    (["nope"], "error: streamlabel: no such command 'nope' (see 'streamlabel --help')"),
    (["model", "eval"], "error: model eval: missing argument ARTIFACT (see 'streamlabel model eval --help')"),
    (["model", "eval", "models/x"], "error: model eval: missing option --data (see 'streamlabel model eval --help')"),
    (["replay"], "error: replay: missing argument FILE (see 'streamlabel replay --help')"),
    (["produce"], "error: produce: give --count or --duration (or both) (e.g. --count 1000 --rate 200)"),
])
def test_parse_and_value_errors_are_one_line_exit_2(capsys, args, line):
    rc, out, err = run_main(capsys, *args)
    assert (rc, err, out) == (2, line + "\n", "")


@pytest.mark.parametrize("args, usage", [([], "Usage: streamlabel [OPTIONS] COMMAND"),
                                         (["model"], "Usage: streamlabel model [OPTIONS] COMMAND"),
                                         (["alerts"], "Usage: streamlabel alerts [OPTIONS] COMMAND")])
def test_bare_command_prints_help_exit_0(capsys, args, usage):
    rc, out, err = run_main(capsys, *args)
    assert rc == 0 and err == ""
    assert usage in out and "Commands" in out


def test_version_from_package_metadata(capsys):
    rc, out, err = run_main(capsys, "--version")
    assert (rc, out, err) == (0, f"streamlabel {importlib.metadata.version('streamlabel')}\n", "")


def test_python_dash_m_entry_point_parse_error_and_version():
    """``python -m pipeline.cli`` (what tests and the load harness start) handles errors like the console script."""
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--workers", "abc"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr, r.stdout) == (
        2, "error: run --workers: expected a whole number, got 'abc' (see 'streamlabel run --help')\n", "")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"streamlabel {importlib.metadata.version('streamlabel')}\n"


@pytest.mark.parametrize("cmd", [["produce", "--count", "5"], ["replay", "FILE"], ["alerts", "tail"]])
def test_unreachable_broker_is_one_fast_line(capsys, tmp_path, cmd):
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\n")
    port = free_port()  # nothing listens there
    args = [str(f) if a == "FILE" else a for a in cmd]
    t0 = time.monotonic()
    rc, out, err = run_main(capsys, *args, "--bootstrap", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5, "a refused connection is reported at once, not after aiokafka's retries"
    where = " ".join(cmd[:2]) if cmd[0] == "alerts" else cmd[0]
    assert rc == 2 and out == ""
    assert err.startswith(f"error: {where}: cannot reach Kafka at 127.0.0.1:{port}: ") and err.count("\n") == 1, err
    assert "check kafka.bootstrap_servers" in err


def test_truncated_or_corrupt_gzip_is_one_line_naming_the_file(capsys, tmp_path):
    whole = gzip.compress(b"".join(b'{"text": "event number %d"}\n' % i for i in range(3000)))
    truncated = tmp_path / "events.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    port = free_port()  # the file is read before any connection: the error is about the file
    rc, out, err = run_main(capsys, "replay", str(truncated), "--bootstrap", f"127.0.0.1:{port}")
    assert (rc, out) == (2, "")
    assert err == (f"error: {truncated}: the gzip file is truncated (it ends before its end-of-stream marker) "
                   "(copy or download it again, or re-compress the original)\n")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"text": "not compressed at all"}\n')
    rc, out, err = run_main(capsys, "replay", str(plain), "--bootstrap", f"127.0.0.1:{port}")
    assert rc == 2 and err == (f"error: {plain}: not a valid gzip file: not a gzipped file "
                               "(copy or download it again, or drop the .gz suffix if it is not compressed)\n")


def alerts_config(tmp_path: Path, redis_url: str) -> Path:
    cfg = tmp_path / "alerts.toml"
    cfg.write_text(f'[alerting]\nstate_redis_url = "{redis_url}"\n\n[[alerting.rules]]\nname = "neg"\nkind = "share"\n'
                   'labels = ["negative"]\nthreshold = 0.7\nwindow_s = 300\n')
    return cfg


def test_alerts_run_unreachable_redis_names_url_without_password(capsys, tmp_path):
    port = free_port()
    cfg = alerts_config(tmp_path, f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    rc, out, err = run_main(capsys, "alerts", "run", "-c", str(cfg), "--bootstrap", f"127.0.0.1:{free_port()}")
    assert (rc, out) == (2, "")
    assert err == (f"error: alerting.state_redis_url: cannot reach Redis at redis://127.0.0.1:{port}/0: connection "
                   "refused (is redis-server running? check the URL; 'none' runs without saved state)\n")
    assert "s3cret-pw" not in err


def test_alerts_run_without_rules_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "empty.toml"
    cfg.write_text("[alerting]\nstate_redis_url = \"none\"\n")
    rc, out, err = run_main(capsys, "alerts", "run", "-c", str(cfg))
    assert (rc, err) == (2, "error: alerting.rules: no alert rules configured "
                            "(add [[alerting.rules]] tables to the config; docs/operations/alerting.md has examples)\n")


def test_bad_config_file_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[kafka]\nbootstrap_server = 'x'\n")
    rc, out, err = run_main(capsys, "produce", "--count", "1", "-c", str(cfg))
    assert rc == 2 and err.startswith(f"error: {cfg}: unknown key 'kafka.bootstrap_server'") and err.count("\n") == 1


@pytest.mark.parametrize("env, line", [
    ({"STREAMLABEL_FORMAT__INPUT": "avro"},
     "error: defaults: format 'avro' needs a Schema Registry: 'format.registry_url' is not set "
     "(e.g. [format] registry_url = \"http://schema-registry:8081\")"),
    ({"STREAMLABEL_FORMAT__OUTPUT": "xml"},
     "error: STREAMLABEL_FORMAT__OUTPUT: 'format.output' is 'xml'; allowed: 'json', 'avro', 'protobuf', 'json-schema'"),
    ({"STREAMLABEL_FORMAT__INPUT": "protobuf", "STREAMLABEL_FORMAT__REGISTRY_URL": "registry:8081"},
     "error: defaults: 'format.registry_url' must be an http:// or https:// URL, got 'registry:8081'"),
    ({"STREAMLABEL_FORMAT__REGISTRY_URL": "http://r:8081", "STREAMLABEL_FORMAT__REGISTRY_USERNAME": "u"},
     "error: defaults: registry basic auth needs both 'format.registry_username' and 'format.registry_password'"),
    ({"STREAMLABEL_TRACING__OTLP_ENDPOINT": "collector:4318"},
     "error: defaults: 'tracing.otlp_endpoint' must be an http:// or https:// URL (OTLP/HTTP), got 'collector:4318' "
     "(e.g. http://otel-collector:4318)"),
    ({"STREAMLABEL_BACKLOG__LAG_RECORDS": "0"}, "error: defaults: 'backlog.lag_records' must be positive, got 0"),
])
def test_format_tracing_and_backlog_settings_errors_are_one_line(capsys, monkeypatch, env, line):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, out, err = run_main(capsys, "produce", "--count", "1")
    assert (rc, err) == (2, line + "\n")


def test_alerting_refuses_a_label_topic_it_cannot_read(capsys, monkeypatch):
    monkeypatch.setenv("STREAMLABEL_FORMAT__OUTPUT", "avro")
    monkeypatch.setenv("STREAMLABEL_FORMAT__REGISTRY_URL", "http://127.0.0.1:9")
    from consumers.alerting import AlertingWorker
    from pipeline.alerts import parse_rules
    from pipeline.config import load_settings
    from pipeline.errors import ConfigError

    s = load_settings()
    s = s.replace(alerting={"rules": parse_rules([{"name": "r", "kind": "share", "labels": ["negative"], "threshold": 0.5,
                                                   "window_s": 60}], "test"), "state_redis_url": None})
    with pytest.raises(ConfigError, match="reads JSON label records"):
        AlertingWorker(s)


# ------------------------------------------------------------------------------------------ demo model slots
def test_demo_default_model_path_follows_the_preset():
    from pipeline.cli.demo import model_slot

    assert model_slot(None, None) == (Path("models/sentiment-minilm"), "sentiment-minilm", True)
    assert model_slot(None, "tiny") == (Path("models/tiny"), "tiny", True)
    assert model_slot(Path("elsewhere"), "tiny") == (Path("elsewhere"), "tiny", True)
    assert model_slot(Path("elsewhere"), None) == (Path("elsewhere"), "sentiment-minilm", False)
    assert model_slot(None, None, "sentiment-quick") == (Path("models/sentiment-quick"), "sentiment-quick", True)


def test_demo_refuses_another_presets_artifact_in_the_slot(capsys, tmp_path, tiny_artifact, monkeypatch):
    slot = tmp_path / "models" / "sentiment-minilm"
    shutil.copytree(tiny_artifact, slot / "1")  # a tiny artifact where sentiment-minilm belongs
    shutil.copytree(tiny_artifact, tmp_path / "models" / "sentiment-quick" / "1")  # and where the demo's default does
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "models").rglob("*"))
    monkeypatch.chdir(tmp_path)
    closed = f"127.0.0.1:{free_port()}"
    rc, out, err = run_main(capsys, "demo", "--bootstrap", closed)  # default preset: sentiment-quick
    assert (rc, out) == (2, "")
    assert err == ("error: demo --model: the artifact at models/sentiment-quick is tiny@1, not the sentiment-quick "
                   "preset (move it out of models/sentiment-quick to build sentiment-quick there, or pass "
                   "--model DIR to run it)\n")
    rc, out, err = run_main(capsys, "demo", "--model", str(slot), "--preset", "sentiment-minilm", "--bootstrap", closed)
    assert rc == 2 and err == (f"error: demo --model: the artifact at {slot} is tiny@1, not the sentiment-minilm preset "
                               "(use --model models/sentiment-minilm for sentiment-minilm, or drop --preset to run "
                               "tiny@1)\n")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "models").rglob("*")) == before, "nothing was built"
    # An explicit --model without --preset runs what is there (here it gets as far as the broker check).
    rc, out, err = run_main(capsys, "demo", "--model", str(slot), "--bootstrap", closed)
    assert rc == 2 and err.startswith(f"error: demo: cannot reach Kafka at {closed}: ")
    rc, out, err = run_main(capsys, "demo", "--preset", "huge", "--bootstrap", closed)
    assert rc == 2 and err.startswith("error: demo --preset: unknown preset 'huge' (choose one of: tiny, ")


def test_bench_refuses_another_presets_artifact_too(capsys, tmp_path, tiny_artifact):
    slot = tmp_path / "sentiment"
    shutil.copytree(tiny_artifact, slot / "1")
    rc, out, err = run_main(capsys, "bench", "--model", str(slot), "--preset", "sentiment-minilm",
                            "--bootstrap", f"127.0.0.1:{free_port()}")
    assert rc == 2 and err.startswith(f"error: bench --model: the artifact at {slot} is tiny@1, not the "
                                      "sentiment-minilm preset")


def test_generator_user_errors_are_one_line(capsys, tmp_path, tiny_artifact):
    rc, _, err = run_main(capsys, "demo", "--task", "poem")
    assert rc == 2 and "error: demo --task: unknown task 'poem'" in err
    cfg = tmp_path / "gen.toml"
    cfg.write_text('[generate]\ntemplate = "reply"\nmax_new_tokens = 0\n')
    rc, _, err = run_main(capsys, "run", "--config", str(cfg))
    assert rc == 2 and "'generate.max_new_tokens' must be positive" in err
    cfg.write_text('[generate]\nstop = 5\n')
    rc, _, err = run_main(capsys, "run", "--config", str(cfg))
    assert rc == 2 and "'generate.stop' must be a list of strings" in err
    rc, _, err = run_main(capsys, "model", "build", "--preset", "tiny", "--variants", "int4", "--out", str(tmp_path))
    assert rc == 2 and "unknown variant 'int4'" in err


@pytest.mark.parametrize("args", [
    ["model", "build", "--preset", "tiny"],
    ["model", "build", "--preset", "tiny-generator"],
    ["model", "distil", "--teacher", "models/none", "--student", "tiny-l1"],
])
def test_build_commands_in_a_serving_install_say_what_to_install(tmp_path, args):
    """A serving-only install (requirements-serve.lock: no torch) asked to build: one line, exit 2."""
    code = ("import sys; sys.modules['torch'] = None; from pipeline.cli import entry; "
            f"sys.argv = ['streamlabel', *{args!r}, '--out', {str(tmp_path)!r}]; entry()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert "needs the train extra, and torch" in r.stderr and "not installed here" in r.stderr
    assert "pip install -e '.[train]'" in r.stderr
