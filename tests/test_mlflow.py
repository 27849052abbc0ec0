"""tracking.backend: mlflow, read back with MLflow's own client: experiment, run name, tags, the loss history equal to
metrics.jsonl, the resolved recipe as params, the adapter as artifacts, a --resume continuing the same run; and the
store checked before the model loads (unreachable server, unwritable store: one error line, nothing written)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_qtune_in_process
from qtune.config import load_recipe
from qtune.errors import QtuneError

pytest.importorskip("mlflow")

SECRET = "hf_qtuneMlflowSecret0123456789"
# What qtune's tracking set-up writes into the environment: put back after each test (in-process runs share it).
SET_BY_QTUNE = ("MLFLOW_TRACKING_URI", "MLFLOW_MAX_LOG_PARAMS", "HF_MLFLOW_LOG_ARTIFACTS", "MLFLOW_NESTED_RUN")


@pytest.fixture(autouse=True)
def _mlflow_state(monkeypatch, tmp_path):
    """MLflow keeps the tracking URI and the active run in process globals: each test starts without them, in its
    own directory (MLflow's local defaults, mlflow.db and mlruns/, are relative to it)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    for key in (*SET_BY_QTUNE, "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(None)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def the_error(result) -> str:
    """One `error:` line (and at most a hint), exit 2, no traceback; the error line."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _sigterm_after_the_first_log(metrics: Path) -> threading.Thread:
    """SIGTERM to this process once training has logged a step (qtune's StopGuard then checkpoints and stops)."""

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.is_file() and '"loss"' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_run_read_back_with_mlflows_client_and_a_resume_after_sigterm_continues_it(make_recipe, tmp_path, chat_data):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = {"backend": "mlflow", "uri": store, "project": "qtune-test", "run_name": "tiny", "log_model": True}
    recipe = make_recipe(
        data={"eval_split": 0.25},
        training={"max_steps": 200, "logging_steps": 1, "eval_steps": 2},
        tracking={**tracking, "tags": ["ci", "team=nlp"]},
    )
    env = {"HF_TOKEN": SECRET, "MLFLOW_TRACKING_TOKEN": SECRET.replace("hf_", "mlf_")}
    run_dir = tmp_path / "run"

    # stopped by SIGTERM (in this process: a stray signal outside training is ignored, not the end of pytest)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        watcher = _sigterm_after_the_first_log(run_dir / "metrics.jsonl")
        stopped = run_qtune_in_process("train", recipe, "--quiet", cwd=tmp_path, env=env)
        watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.returncode == 2 and "training stopped by SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    [checkpoint] = (run_dir / "checkpoints").glob("checkpoint-*")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]

    # --resume with an end in sight: the same MLflow run goes on; its params keep their first values (said once)
    resumed = run_qtune_in_process(
        "train", recipe, "--quiet", "--resume", f"training.max_steps={step + 2}", cwd=tmp_path, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training.max_steps stays 200" in resumed.stderr and "training.resume" not in resumed.stderr

    experiment = client.get_experiment_by_name("qtune-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.run_name == "tiny" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["ci"] == "" and tags["team"] == "nlp" and tags["qtune.run_dir"] == str(run_dir)

    # the resolved recipe as params, named by their key paths; not the trainer's arguments (the recipe says them)
    params = run.data.params
    assert params["lora.r"] == "8" and params["training.lr"] == "0.001" and params["method"] == "sft"
    assert params["data.datasets.0.path"] == str(chat_data) and params["tracking.uri"] == store
    assert params["training.max_steps"] == "200" and params["quantization.bits"] == "4"
    assert "learning_rate" not in params and "dpo" not in params

    # the figures: the loss history is metrics.jsonl's, step by step over both sessions; eval and qtune's own beside it
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    assert history("loss") == [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in history("loss")] == list(range(1, step + 3))
    assert [s for s, _ in history("tokens_per_s")] == list(range(1, step + 3))
    assert {s for s, _ in history("eval_loss")} >= {step + 2}
    assert history("summary/steps") == [(step + 2, float(step + 2))]

    # artifacts: the adapter (log_model), the recipe and the summary; never a (pickled) checkpoint
    assert {a.path for a in client.list_artifacts(run_id)} == {"adapter", "recipe.yaml", "summary.json"}
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    assert f"mlflow ui --backend-store-uri {store}" in resumed.stdout and run_id in resumed.stdout

    # secrets from the environment reach neither the store nor the console
    for path in [tmp_path / "mlflow.db", *(tmp_path / "mlruns").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and env["MLFLOW_TRACKING_TOKEN"].encode() not in data, path
    for result in (stopped, resumed):
        assert SECRET not in result.stdout + result.stderr


def test_params_are_the_redacted_recipe_flattened_as_overrides_name_keys(make_recipe):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from qtune.mlflow_tracking import recipe_params

    long_template = "{{ messages }}" + "x" * 7000
    recipe = load_recipe(
        make_recipe(tracking={"backend": "mlflow"}),
        [
            "training.extra={hub_token: " + SECRET + ", warmup_steps: 2}",
            "lora.target_modules=[q_proj,v_proj]",
            f"data.chat_template={long_template}",
        ],
    )
    params = recipe_params(recipe)
    assert params["training.extra.hub_token"] == "<redacted>" and SECRET not in json.dumps(params)
    assert params["training.extra.warmup_steps"] == "2"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]' and params["lora.r"] == "8"
    assert params["training.max_steps"] == "4" and params["model.revision"] == "null"
    assert params["data.datasets.0.path"].endswith("train.jsonl") and params["tracking.backend"] == "mlflow"
    template = params["data.chat_template"]
    assert len(template) == MAX_PARAM_VAL_LENGTH and template.endswith("characters: see recipe.yaml]")
    assert not any(key.startswith(("dpo", "kto", "grpo")) for key in params)  # unused method sections


def test_the_default_store_is_mlflows_sqlite_file_in_the_working_directory(make_recipe, tmp_path, monkeypatch):
    from qtune.mlflow_tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(make_recipe(tracking={"backend": "mlflow"}))
    assert tracking_uri(recipe) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(recipe) == "http://tracking.example:5000"  # the environment's, as MLflow's own default
    recipe = load_recipe(make_recipe(tracking={"backend": "mlflow", "uri": "sqlite:///runs.db"}))
    assert tracking_uri(recipe) == f"sqlite:///{tmp_path}/runs.db"  # the recipe wins, made absolute


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"backend": "mlflow", "uri": "https://me:pw@mlflow.example"}, "credentials in the URI"),
        ({"backend": "mlflow", "uri": "https://mlflow.example/?token=abc"}, "credentials in the URI"),
        ({"backend": "wandb", "uri": "sqlite:///mlflow.db"}, "tracking.uri is MLflow's"),
        ({"backend": "mlflow", "mode": "offline"}, "tracking.mode is a W&B setting"),
        ({"backend": "mlflow", "entity": "team"}, "tracking.entity is a W&B setting"),
        ({"backend": "mlflow", "tags": ["ok", "bad?tag=1"]}, "tracking.tags.1: 'bad?tag' is not an MLflow tag name"),
    ],
)
def test_recipe_keys_mlflow_cannot_honour_are_refused(make_recipe, tracking, message):
    with pytest.raises(QtuneError, match="tracking") as err:
        load_recipe(make_recipe(tracking=tracking))
    assert message in str(err.value)


def test_a_resolved_mlflow_recipe_reads_back(make_recipe, tmp_path):
    from qtune.config import dump_recipe

    recipe = load_recipe(make_recipe(tracking={"backend": "mlflow", "uri": "http://127.0.0.1:5000", "tags": ["a=b"]}))
    dump_recipe(recipe, tmp_path / "out" / "recipe.yaml")
    assert load_recipe(tmp_path / "out" / "recipe.yaml").tracking == recipe.tracking
    # tracking switched off by an override keeps the recipe's uri valid (estimate --probe does this)
    assert load_recipe(tmp_path / "out" / "recipe.yaml", ["tracking.backend=none"]).tracking.backend == "none"


# --------------------------------------------------------------------------- refused before the model loads


def _refused(make_recipe, tmp_path, uri: str | None, env: dict | None = None):
    tracking = {"backend": "mlflow", **({"uri": uri} if uri else {})}
    recipe = make_recipe(tracking=tracking)
    started = time.time()
    result = run_qtune_in_process("train", recipe, cwd=tmp_path, env=env)
    line = the_error(result)
    assert not (tmp_path / "run").exists(), "the output dir was created"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    return line, result, time.time() - started


def test_an_unreachable_server_is_refused_fast_naming_the_uri(make_recipe, tmp_path):
    line, result, seconds = _refused(make_recipe, tmp_path, "http://127.0.0.1:9")
    assert "tracking.uri http://127.0.0.1:9: the MLflow tracking server cannot be used" in line
    assert "Connection refused" in line and "MLFLOW_TRACKING_TOKEN" in result.stderr
    assert seconds < 60  # MLflow's own defaults retry 7 times with backoff (minutes); the check tries once


class _SilentHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        time.sleep(5)  # longer than the check waits

    def log_message(self, *args):
        pass


def test_a_server_that_never_answers_is_given_up_after_the_check_timeout(make_recipe, tmp_path, monkeypatch):
    from qtune import mlflow_tracking

    monkeypatch.setattr(mlflow_tracking, "CHECK_TIMEOUT_S", 1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        recipe = load_recipe(make_recipe(tracking={"backend": "mlflow", "uri": uri}))
        started = time.time()
        with pytest.raises(QtuneError, match="no answer within 1 s") as err:
            mlflow_tracking.check(recipe)
        assert time.time() - started < 4 and uri in str(err.value)  # one try, no retries
    finally:
        server.shutdown()


class _MlflowLikeHandler(http.server.BaseHTTPRequestHandler):
    """Answers get-by-name as an MLflow server does for an experiment that does not exist yet."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append(self.path)
        body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_answers_passes_the_check(make_recipe):
    from qtune import mlflow_tracking

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MlflowLikeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        mlflow_tracking.check(load_recipe(make_recipe(tracking={"backend": "mlflow", "uri": uri, "project": "p"})))
        assert any("get-by-name" in path and "experiment_name=p" in path for path in _MlflowLikeHandler.seen)
    finally:
        server.shutdown()


def test_a_store_that_cannot_be_written_is_refused(make_recipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    line, _, _ = _refused(make_recipe, tmp_path, f"sqlite:///{tmp_path}/missing/mlflow.db")
    assert f"the folder {tmp_path}/missing does not exist" in line
    line, _, _ = _refused(make_recipe, tmp_path, f"sqlite:///{blocker}/mlflow.db")
    assert f"{blocker} is not a folder" in line
    # MLflow's file store (a folder): refused by MLflow 3.7+ unless opted in, then checked like the others
    line, result, _ = _refused(make_recipe, tmp_path, str(tmp_path / "mlruns"))
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line + result.stderr and "sqlite:///" in result.stderr
    line, _, _ = _refused(make_recipe, tmp_path, f"file://{blocker}/mlruns", env={"MLFLOW_ALLOW_FILE_STORE": "true"})
    assert f"file://{blocker}/mlruns" in line and f"{blocker} is not a folder" in line


def test_mlflow_not_installed_is_refused_with_the_install_line(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib.util.find_spec("mlflow") is None, as uninstalled
    line, result, _ = _refused(make_recipe, tmp_path, None)
    assert "tracking.backend: mlflow is not installed" in line
    assert "pip install 'qtune[mlflow]'" in result.stderr


def test_the_run_id_file_is_one_of_the_runs_outputs():
    from qtune.rundir import RunDir

    run = RunDir(Path("runs/x"))
    assert run.mlflow_run_id.name in RunDir.OUTPUTS  # --overwrite removes it: the new run gets a new MLflow run
