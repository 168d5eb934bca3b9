"""Ray jobs: a sweep submitted with ``ray job submit`` to a two-node cluster with shared
storage and token authentication, and its dashboards in a real browser.

One module fixture builds what docs/run.md's multi-node recipe describes, on this machine:
an S3 server (moto) holding ``sweep.output_dir``, a PostgreSQL server holding the Optuna
study, and a Ray cluster of two ``ray start`` nodes on loopback addresses 127.0.0.2 and
127.0.0.3 (one CPU each, token authentication on, the token given to both), to which the
sweep is submitted with ``ray job submit`` and ``experiments/runtime_env.yaml``. Each trial
records the Ray node it ran on (``final.json``: ``node_id``), so the test can check that the
trials ran on both nodes. The job API must refuse requests without the token, the job's log
must be free of tracebacks, and a second, tiny job checks what a job sees of its uploaded
working dir. The browser test then opens ``medalign dashboard`` on the same remote sweep in
headless Chromium, with the Ray look-up joining this cluster.

The cluster's processes are its own (``ray start --block`` in new sessions, its own temp dirs,
ports and token); it is stopped by SIGTERM to those processes, never by ``ray stop``, which
selects processes by name and would stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUM_TRIALS = 2  # both at once, one per node
JOB_TIMEOUT_S = 420
TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.val_size=8", "trainer.test_size=8",
        "trainer.batch_size=4", "trainer.log_every=1", "trainer.max_new_tokens=4", "sweep.asha.grace_period=2"]
ARTIFACTS_ENV = "MEDALIGN_TEST_ARTIFACTS"  # where the browser test keeps its screenshots


@pytest.fixture(scope="module")
def two_node_sweep(tmp_path_factory, s3, postgres):
    """S3 + PostgreSQL (the session's servers) + a two-node Ray cluster; a 2-trial sweep
    submitted as a job and finished."""
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed
    from ray_cluster import LocalCluster

    work = tmp_path_factory.mktemp("multinode")
    cache = work / "cache"
    prepare_mini_synthmed(cache)
    cluster = LocalCluster(env=s3.env)  # every node reaches the bucket with the same settings
    try:
        cluster.start_head(num_cpus=1, node_ip="127.0.0.2")
        cluster.add_node(num_cpus=1, node_ip="127.0.0.3")
        output = s3.uri("sweeps")
        entrypoint = [f"MEDALIGN_CACHE={cache}", "python", "-m", "medalign_platform", "sweep",
                      "experiment=synthmed_vqa", "search=smoke", f"sweep.num_samples={NUM_TRIALS}",
                      "sweep.max_concurrent=2", "sweep.trial_resources={CPU:1}", f"sweep.output_dir={output}",
                      f"sweep.storage={postgres.url}", "sweep.name=multinode", "sweep.verbose=0", *TINY]
        started = time.monotonic()
        submitted = cluster.ray("job", "submit", "--address", cluster.url, "--runtime-env",
                                "experiments/runtime_env.yaml", "--submission-id", "multinode", "--no-wait",
                                "--", *entrypoint, cwd=REPO)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        info = _wait_for_job(cluster, "multinode")
        logs = cluster.ray("job", "logs", "multinode", "--address", cluster.url).stdout
        (work / "job.log").write_text(logs)
        print(f"\ntwo-node sweep job {info['status']} after {time.monotonic() - started:.0f}s")
        yield {"info": info, "logs": logs, "experiment": f"{output}/multinode", "s3": s3, "pg": postgres,
               "nodes": cluster.alive_nodes(), "cache": cache, "work": work, "cluster": cluster}
    finally:
        cluster.stop()


def _wait_for_job(cluster, submission_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    info: dict = {}
    while time.monotonic() < deadline:
        info = cluster.api(f"/api/jobs/{submission_id}")
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        time.sleep(1.0)  # poll interval
    pytest.fail(f"job {submission_id} still {info.get('status')} after {JOB_TIMEOUT_S}s")


def _tracebacks(log: str) -> list[str]:
    """The traceback header lines of ``log``, except Python's "Exception ignored in" reports.

    Those are unraisable exceptions, not errors: when Tune stops a finished trial's actor,
    Ray's SIGTERM handler raises SystemExit, and if that lands inside a garbage-collector
    callback Python prints it as ignored while the actor exits anyway.
    """
    rows = log.splitlines()
    return [row for i, row in enumerate(rows)
            if "Traceback (most recent call last)" in row and not (i and "Exception ignored in" in rows[i - 1])]


def _around(text: str, needle: str, lines: int = 30) -> str:
    """The lines around the first ``needle`` (for a readable failure message)."""
    rows = text.splitlines()
    at = next((i for i, row in enumerate(rows) if needle in row), len(rows))
    return "\n".join(rows[max(0, at - 5):at + lines])


# --------------------------------------------------------------------------- the job and its cluster


def test_token_authentication_is_on(two_node_sweep):
    cluster = two_node_sweep["cluster"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cluster.url + "/api/jobs/", timeout=10)  # no bearer token
    assert refused.value.code == 401
    unauthenticated = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", cluster.url],
                            env=unauthenticated, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "Authentication required" in result.stdout + result.stderr


def test_sweep_job_succeeds_without_a_traceback_and_ran_the_uploaded_working_dir(two_node_sweep):
    info, logs = two_node_sweep["info"], two_node_sweep["logs"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-5000:]}"
    assert two_node_sweep["experiment"] in logs  # the sweep's closing summary names its folder
    real = _tracebacks(logs)
    assert not real, "\n\n".join(_around(logs, line) for line in real[:3])
    runtime_env = info["runtime_env"]  # experiments/runtime_env.yaml, as Ray recorded it
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_")  # the repository, zipped and uploaded
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert {".venv/", "sweeps/", "runs/", ".git/", "*.pt"} <= set(runtime_env["excludes"])


STORAGE_CHECK = ("import json; from medalign_platform.run.storage import detect_job_working_dir, storage_warnings; "
                 "print('STORAGE', json.dumps([detect_job_working_dir(), "
                 "storage_warnings('sweeps', ray_address=None, setting='sweep.output_dir')]))")


def test_storage_check_sees_that_a_relative_path_lands_in_the_job_copy(two_node_sweep):
    """Inside a real job the working dir copy is detected and a relative output dir is flagged."""
    cluster = two_node_sweep["cluster"]
    result = cluster.ray("job", "submit", "--address", cluster.url, "--runtime-env", "experiments/runtime_env.yaml",
                         "--submission-id", "storage-check", "--no-wait", "--", "python", "-c", STORAGE_CHECK,
                         cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    info = _wait_for_job(cluster, "storage-check")
    logs = cluster.ray("job", "logs", "storage-check", "--address", cluster.url).stdout
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    line = next(row for row in logs.splitlines() if row.startswith("STORAGE "))
    job_dir, warnings = json.loads(line.split(" ", 1)[1])
    # A job's driver runs on the head node, in its copy of the working dir under the head's temp dir.
    assert job_dir.startswith(str(cluster.root / "ray")) and "/runtime_resources/working_dir_files/" in job_dir
    (warning,) = warnings
    assert f"results go to {job_dir}/sweeps" in warning and "sweep.output_dir=sweeps" in warning


def test_trials_ran_on_both_nodes_and_every_result_is_in_shared_storage(two_node_sweep):
    import optuna
    from medalign_platform.run.filesystems import StoragePath

    info, logs = two_node_sweep["info"], two_node_sweep["logs"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-5000:]}"
    experiment = StoragePath(two_node_sweep["experiment"])
    nodes = two_node_sweep["nodes"]
    assert sorted(n["node_ip"] for n in nodes.values()) == ["127.0.0.2", "127.0.0.3"]  # two raylets, on loopback

    summary = (experiment / "summary.json").read_json()
    assert summary["trials"] == {"TERMINATED": NUM_TRIALS} and summary["num_trials"] == NUM_TRIALS
    assert summary["study"]["storage"] == two_node_sweep["pg"].url
    finals = {}
    for record in summary["records"]:
        trial = experiment / f"trial_{record['trial_id']}"
        assert record["path"] == str(trial)  # the records name the shared storage, not a local copy
        finals[record["trial_id"]] = (trial / "final.json").read_json()
        files = trial.files()
        assert any(name.startswith("tensorboard/events.out.tfevents.") for name in files), sorted(files)
        assert any(re.fullmatch(r"checkpoint_\d+/adapter/adapter_model\.safetensors", n) for n in files)
        assert finals[record["trial_id"]]["metrics"]["step"] == 2
    assert {final["node_id"] for final in finals.values()} == set(nodes)  # both nodes ran trials

    study = optuna.load_study(study_name="multinode", storage=two_node_sweep["pg"].url)
    complete = {t.user_attrs["tune_trial_id"]: t.values[0] for t in study.trials if t.state.name == "COMPLETE"}
    assert len(study.trials) == NUM_TRIALS
    assert complete == {tid: final["metrics"]["val/closed_accuracy"] for tid, final in finals.items()}


def test_status_reads_the_remote_sweep_and_writes_its_results_back(two_node_sweep, monkeypatch, capsys):
    """``medalign status s3://...`` (in this process: the session's S3 settings are in its environment)."""
    from medalign_platform.cli import main
    from medalign_platform.run.filesystems import StoragePath

    monkeypatch.setenv("MEDALIGN_CACHE", str(two_node_sweep["cache"]))
    assert main(["status", two_node_sweep["experiment"]]) == 0
    out = capsys.readouterr().out
    assert f"Sweep multinode ({two_node_sweep['experiment']}): {NUM_TRIALS} trials ({NUM_TRIALS} TERMINATED)" in out
    experiment = StoragePath(two_node_sweep["experiment"])
    rows = (experiment / "results" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == NUM_TRIALS + 1
    runs = {name.split("/")[0] for name in (experiment / "tensorboard").files()}
    assert {f"trial_{r['trial_id']}" for r in (experiment / "summary.json").read_json()["records"]} <= runs


# --------------------------------------------------------------------------- dashboards in a browser

DEEP_TEXT = """
// The visible text of the page, through shadow roots (TensorBoard's Polymer plugins) and
// same-origin iframes, without style sheets and scripts.
function walk(node, out) {
  if (node.nodeType === Node.TEXT_NODE) { out.push(node.textContent); return; }
  if (node.nodeType === Node.ELEMENT_NODE && (node.tagName === 'STYLE' || node.tagName === 'SCRIPT')) return;
  if (node.shadowRoot) walk(node.shadowRoot, out);
  if (node.tagName === 'IFRAME') { try { walk(node.contentDocument, out); } catch (e) {} }
  for (const child of node.childNodes) walk(child, out);
}
const out = []; walk(document, out); return out.join(' ').split(/\\s+/).join(' ');
"""


def to_precision(value: float, digits: int = 5) -> str:
    """JavaScript's ``value.toPrecision(digits)`` for the numbers TensorBoard's HParams table shows."""
    if value == 0:
        return f"{0:.{digits - 1}f}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value:.{max(digits - 1 - exponent, 0)}f}"


def _chromium():
    """Headless Chromium through chromedriver (Debian's packages), or a skip saying how to get them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (`make system-deps`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1600,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _page_text(browser, url: str, needles: list[str], screenshot: Path, timeout: float = 120) -> str:
    """Loads ``url`` afresh and polls its text until every needle is in it; keeps a screenshot
    either way (the page as it was when the needles appeared, or when the wait gave up)."""
    browser.get("about:blank")  # a single-page app keeps its old view on a fragment change: start afresh
    browser.get(url)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = browser.execute_script(DEEP_TEXT) or ""
        if all(needle in text for needle in needles):
            break
        time.sleep(0.5)  # the single-page apps fetch and render asynchronously
    browser.save_screenshot(str(screenshot))
    missing = [n for n in needles if n not in text]
    assert not missing, f"{url} never showed {missing} (screenshot {screenshot}); it shows: {text[:3000]}"
    return text


def _artifacts() -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or REPO / ".test-artifacts") / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_dashboards_in_headless_chromium(two_node_sweep):
    """``medalign dashboard`` on the remote sweep: TensorBoard's scalars and HParams table list
    every trial with its searched values, optuna-dashboard shows the PostgreSQL study, the Ray
    look-up joins the cluster (its token from the environment) and prints its dashboard; a
    screenshot of each page is kept (the folder is printed)."""
    import optuna

    browser = _chromium()
    cluster = two_node_sweep["cluster"]
    # The cluster's environment (S3 settings, its token): the Ray look-up joins this cluster.
    env = {**cluster.env, "MEDALIGN_CACHE": str(two_node_sweep["cache"]), "RAY_ADDRESS": cluster.gcs_address}
    result = subprocess.run([sys.executable, "-m", "medalign_platform", "dashboard", two_node_sweep["experiment"],
                             "port=0", "optuna_port=0", "wait=false"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    pids = re.search(r"stop them with: kill ([\d ]+)", result.stdout)
    artifacts = _artifacts()
    print(f"\nbrowser screenshots: {artifacts}")  # kept as the test's artifacts
    try:
        assert result.returncode == 0 and pids, result.stdout + result.stderr
        assert re.search(r"Ray dashboard\s+(\S+)", result.stdout).group(1) == cluster.url, result.stdout
        tensorboard = re.search(r"TensorBoard\s+(http://\S+)", result.stdout).group(1)
        optuna_url = re.search(r"optuna-dashboard\s+(http://\S+)", result.stdout).group(1)
        from medalign_platform.run.filesystems import StoragePath

        records = (StoragePath(two_node_sweep["experiment"]) / "summary.json").read_json()["records"]
        trial_ids = [r["trial_id"] for r in records]

        # TensorBoard, time series: one run per trial, the evaluation curves.
        _page_text(browser, tensorboard + "#timeseries", [f"trial_{t}" for t in trial_ids] + ["/closed_accuracy"],
                   artifacts / "tensorboard-scalars.png")
        # TensorBoard, HParams table: a row per trial with its sampled values and the metric.
        text = _page_text(browser, tensorboard + "#hparams",
                          ["Trial ID", *trial_ids, "distill.lambda_align", "lora.rank", "val/closed_accuracy"],
                          artifacts / "tensorboard-hparams.png")
        table = text[text.index("Trial ID"):]
        for record in records:  # each row: the trial id, then its searched values
            row = table[table.index(record["trial_id"]):]
            assert to_precision(record["params"]["distill.lambda_align"]) in row[:200], (record, row[:200])

        # optuna-dashboard on the PostgreSQL study: its trials, their states and their Tune ids.
        study_id = optuna.storages.RDBStorage(two_node_sweep["pg"].url).get_study_id_from_name("multinode")
        text = _page_text(browser, optuna_url.rstrip("/") + f"/dashboard/studies/{study_id}/trials",
                          [f"multinode (id={study_id})", f"{len(trial_ids)} Trials", "Best Trial", "tune_trial_id"],
                          artifacts / "optuna-dashboard-trials.png")
        assert text.count("Complete") >= len(trial_ids)
        assert any(f"tune_trial_id {t}" in text for t in trial_ids)  # the first trial's user attribute
    finally:
        browser.quit()
        if pids:
            for pid in pids.group(1).split():
                try:
                    os.killpg(int(pid), signal.SIGTERM)  # each server runs in its own process group
                except ProcessLookupError:
                    pass
