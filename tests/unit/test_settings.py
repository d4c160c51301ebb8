"""Settings: one source for every default, every value checked before anything starts."""

from __future__ import annotations

import asyncio
from dataclasses import fields

import pytest

from service.alignment import TrainerConfig
from service.cli import build_parser, main
from service.core.acquisition import AcquisitionConfig
from service.core.budget import TUNED_RANDOM_AFTER, TUNED_WARMUP_ACCEPTS, BudgetConfig
from service.core.selector import SelectorConfig
from service.settings import ACQUISITION_FIELDS, Settings, SettingsError

# ----------------------------------------------------------------------------- defaults


def test_engine_defaults_come_from_the_core_dataclasses():
    s = Settings()
    sel, bud, tr = SelectorConfig(), BudgetConfig(), TrainerConfig()
    assert (s.uncertainty, s.index_size, s.cache_capacity) == (sel.uncertainty, sel.index_size,
                                                               sel.cache_capacity)
    assert (s.explore_fraction, s.threshold_window) == (bud.explore, bud.window)
    assert (s.embedding_dim, s.learner, s.self_learning) == (tr.dim_out, tr.method,
                                                             tr.self_learning)  # pca_dim: its own
    assert s.trainer_config() == tr
    assert s.warmup_accepts == TUNED_WARMUP_ACCEPTS
    assert s.random_after == TUNED_RANDOM_AFTER  # the simulator's default too (SimConfig)
    assert s.acquisition_config() == AcquisitionConfig()
    assert set(ACQUISITION_FIELDS) == {f.name for f in fields(AcquisitionConfig)}
    for name in ACQUISITION_FIELDS:  # every knob is a setting, its default the core's
        assert getattr(s, name) == getattr(AcquisitionConfig(), name), name


def test_default_settings_build_the_default_engine_configs():
    s = Settings()
    cfg = s.selector_config()
    assert cfg == SelectorConfig(budget=BudgetConfig(target_rate=0.05, warmup_accepts=50,
                                                     random_after=TUNED_RANDOM_AFTER))
    assert cfg.budget.total is None  # -1 = unlimited
    assert cfg.budget.random_tail_from is None  # no total, no share to reach: no random tail
    assert Settings(budget_total=300).budget_config().random_tail_from == 100
    assert s.trainer_config() == TrainerConfig()
    assert s.torch_device is None  # auto


def test_settings_reach_the_engine(monkeypatch):
    from service.runtime import build_engine

    s = Settings(modalities="a:6,b:5", embedding_dim=4, index_size=16, cache_capacity=8,
                 budget_total=7, target_rate=0.2, threshold_window=99, normalization="rank",
                 uncertainty_weight=0.4, diversity_weight=0.6, coverage_weight=0.0, quotas=True,
                 quota_min_share=0.3, random_after=0.5, device="cpu")
    handler = build_engine(s)
    try:
        cfg = handler.selector.config
        assert cfg == s.selector_config()
        assert (cfg.budget.total, cfg.budget.target_rate, cfg.budget.window) == (7, 0.2, 99)
        assert (cfg.budget.random_after, cfg.budget.random_tail_from) == (0.5, 4)  # round(3.5)
        assert (cfg.acquisition.normalization, cfg.acquisition.quotas,
                cfg.acquisition.quota_min_share) == ("rank", True, 0.3)
        assert handler.trainer.config == s.trainer_config()
        assert handler.scorer_device == "cpu"
    finally:
        handler.close()


# ----------------------------------------------------------------------------- validation

BAD = [
    ("grpc_port", 70000, "0 (pick a free port) or 1-65535"),
    ("metrics_port", -1, "0 (pick a free port) or 1-65535"),
    ("target_rate", 0.0, "(0, 1]"),
    ("target_rate", 1.5, "(0, 1]"),
    ("random_after", 0.0, "(0, 1]"),
    ("explore_fraction", 2.0, "[0, 1]"),
    ("budget_total", -2, "-1 (unlimited)"),
    ("warmup_accepts", -1, ">= 0"),
    ("threshold_window", 0, ">= 1"),
    ("cache_capacity", 0, ">= 1"),
    ("index_size", 0, ">= 1"),
    ("embedding_dim", 0, ">= 1"),
    ("batch_max_items", 0, ">= 1"),
    ("features_partitions", 0, ">= 1"),
    ("max_message_bytes", 0, ">= 1"),
    ("max_wait_seconds", 0.0, "> 0"),
    ("uncertainty", "bald", "least_confidence, margin, entropy"),
    ("uncertainty_weight", -0.1, ">= 0"),
    ("diversity_weight", float("nan"), ">= 0"),
    ("coverage_weight", -1.0, ">= 0"),
    ("normalization", "minmax", "zscore or rank"),
    ("zscore_alpha", 0.0, "(0, 1]"),
    ("rank_window", 0, ">= 1"),
    ("coverage_alpha", 1.5, "(0, 1]"),
    ("quotas", 2, "0 or 1"),
    ("quota_gamma", -1.0, ">= 0"),
    ("quota_min_share", 0.6, "[0, 0.5]"),
    ("quota_tolerance", 1.5, "[0, 1]"),
    ("quota_min_accepts", -1, ">= 0"),
    ("retrain_every_pairs", 0, ">= 1"),
    ("cache_half_life", -1.0, ">= 0"),
    ("typicality_weight", -0.5, ">= 0"),
    ("typicality_k", 0, ">= 1"),
    ("candidates_k", -1, ">= 0"),
    ("follow_selections", 2, "0 or 1"),
    ("device", "gpu", "cpu, cuda, cuda:N or auto"),
    ("device", "cuda:x", "cpu, cuda, cuda:N or auto"),
    ("seed", -1, ">= 0"),
    ("compute_threads", 0, ">= 1"),
    ("fetch_max_wait_seconds", 60.0, "(0, 30]"),
    ("session_timeout_seconds", 0.0, "> 0"),
    ("rebalance_timeout_seconds", -1.0, "> 0"),
    ("shutdown_grace_seconds", -1.0, ">= 0"),
    ("modalities", "image:512", "two distinct NAME:DIM"),
    ("modalities", "a:3,a:4", "two distinct NAME:DIM"),
    ("group_id", "", "a non-empty name"),
    ("log_level", "verbose", "CRITICAL, ERROR, WARNING, INFO, DEBUG"),
]


@pytest.mark.parametrize("name,value,allowed", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_variable_flag_value_and_what_is_allowed(name, value,
                                                                                allowed):
    with pytest.raises(SettingsError) as err:
        Settings(**{name: value})
    assert len(err.value.errors) == 1
    line = err.value.errors[0]
    assert "\n" not in line
    assert line.startswith(f"{Settings.env_name(name)} ({Settings.flag_name(name)}) = "
                           f"{value!r}: expected ")
    assert allowed in line


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings(grpc_port=-5, target_rate=0, device="tpu")
    assert [e.split(" ", 1)[0] for e in err.value.errors] == [
        "PAIRSIEVE_GRPC_PORT", "PAIRSIEVE_TARGET_RATE", "PAIRSIEVE_DEVICE"]


def test_ports_must_differ_unless_picked_free():
    with pytest.raises(SettingsError, match="are both 9000: expected two different ports"):
        Settings(grpc_port=9000, metrics_port=9000)
    Settings(grpc_port=0, metrics_port=0)  # both pick a free one: fine
    Settings(grpc_port=1, metrics_port=65535)


def test_odd_embedding_dim_needs_the_cca_learner():
    with pytest.raises(SettingsError, match=r"PAIRSIEVE_EMBEDDING_DIM \(--embedding-dim\) = 127: "
                       "expected an even number with learner 'auto'"):
        Settings(embedding_dim=127)
    assert Settings(embedding_dim=127, learner="cca").trainer_config().blocks == 1
    with pytest.raises(SettingsError,
                       match=r"PAIRSIEVE_SELF_LEARNING \(--self-learning\) = 'yes'"):
        Settings(self_learning="yes")


def test_tls_needs_both_files():
    with pytest.raises(SettingsError, match="TLS needs both .* got only the certificate"):
        Settings(tls_cert_file="c.pem")


@pytest.mark.parametrize("device", ["", "auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_spellings_accepted(device):
    assert Settings(device=device).device == device


def test_environment_values_are_converted_and_checked():
    s = Settings.from_env({"PAIRSIEVE_QUOTAS": "true", "PAIRSIEVE_UNCERTAINTY_WEIGHT": "0.5",
                           "PAIRSIEVE_RANK_WINDOW": "64", "PAIRSIEVE_NORMALIZATION": "rank"})
    assert (s.quotas, s.uncertainty_weight, s.rank_window, s.normalization) == (True, 0.5, 64,
                                                                                "rank")
    assert Settings.from_env({"PAIRSIEVE_QUOTAS": "0"}).quotas is False
    with pytest.raises(SettingsError, match=r"^PAIRSIEVE_GRPC_PORT = 'http': expected an "
                                            r"integer$"):
        Settings.from_env({"PAIRSIEVE_GRPC_PORT": "http"})
    with pytest.raises(SettingsError, match=r"PAIRSIEVE_TARGET_RATE = 'inf': expected a number"):
        Settings.from_env({"PAIRSIEVE_TARGET_RATE": "inf"})
    with pytest.raises(SettingsError, match="PAIRSIEVE_QUOTAS = 'maybe': expected 0 or 1"):
        Settings.from_env({"PAIRSIEVE_QUOTAS": "maybe"})
    with pytest.raises(SettingsError, match=r"PAIRSIEVE_DEVICE \(--device\) = 'gpu'"):
        Settings.from_env({"PAIRSIEVE_DEVICE": "gpu"})


def test_flags_win_and_are_converted_like_the_environment():
    s = Settings.from_env({"PAIRSIEVE_GRPC_PORT": "1234"}, grpc_port="4321")
    assert s.grpc_port == 4321
    with pytest.raises(SettingsError, match="^--grpc-port = 'x': expected an integer$"):
        Settings.from_env({}, grpc_port="x")


# ----------------------------------------------------------------------------- environment


def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_when_unavailable_falls_back_to_the_cpu_with_a_warning_and_the_gauge(
        monkeypatch, caplog, device):
    """Issue 16 item 4: a GPU deployment on a node without CUDA keeps serving on the CPU; the
    log says so and pairsieve_scorer_gpu_fallback = 1 (the ScorerFellBackToCPU alert)."""
    from prometheus_client import CollectorRegistry

    from service.observability.metrics import PairsieveMetrics
    from service.runtime import build_engine

    _no_cuda(monkeypatch)
    s = Settings(device=device, modalities="image:12,text:8", embedding_dim=8)
    s.check_environment()  # not a settings error
    assert s.resolve_device() == ("cpu", True)
    registry = CollectorRegistry()
    metrics = PairsieveMetrics(registry)
    with caplog.at_level("WARNING", logger="pairsieve.runtime"):
        handler = build_engine(s, metrics)
    assert handler.scorer_device == "cpu"
    assert any("no CUDA device is available here: scoring on the CPU" in r.getMessage()
               for r in caplog.records)
    metrics.scorer_device(handler.scorer_device, gpu_expected=s.gpu_expected)
    assert registry.get_sample_value("pairsieve_scorer_gpu_fallback") == 1
    for ok in ("cpu", "auto"):
        Settings(device=ok).check_environment()
        assert Settings(device=ok).resolve_device()[1] is False
    metrics.scorer_device("cpu", gpu_expected=Settings(device="cpu").gpu_expected)
    assert registry.get_sample_value("pairsieve_scorer_gpu_fallback") == 0


def test_cuda_index_beyond_the_devices_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    Settings(device="cuda:1").check_environment()
    with pytest.raises(SettingsError, match=r"= 'cuda:2': only 2 CUDA device\(s\) here "
                                            r"\(cuda:0..cuda:1\)"):
        Settings(device="cuda:2").check_environment()


def test_model_dir_checks(tmp_path):
    Settings(model_dir=str(tmp_path / "new" / "deeper")).check_environment()  # created later
    Settings(model_dir=str(tmp_path)).check_environment()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SettingsError, match=r"^PAIRSIEVE_MODEL_DIR \(--model-dir\) = "
                                            r"'.*afile': exists but is not a directory$"):
        Settings(model_dir=str(afile)).check_environment()
    with pytest.raises(SettingsError, match="does not exist and cannot be created"):
        Settings(model_dir=str(afile / "sub")).check_environment()


def test_tls_files_must_exist(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError) as err:
        Settings(tls_cert_file=str(cert), tls_key_file=str(tmp_path / "k.pem")).check_environment()
    assert err.value.errors == [f"PAIRSIEVE_TLS_KEY_FILE (--tls-key-file) = "
                                f"'{tmp_path / 'k.pem'}': no such readable file"]


def test_missing_model_dir_is_a_cold_start_and_a_bad_checkpoint_one_line(tmp_path):
    from service.runtime import initial_model

    s = Settings(modalities="a:6,b:5", embedding_dim=4, model_dir=str(tmp_path / "missing"))
    assert initial_model(s).version == 0
    assert not (tmp_path / "missing").exists()  # created with the first checkpoint only
    (tmp_path / "LATEST").write_text("model-v000001\n")
    (tmp_path / "model-v000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        initial_model(Settings(modalities="a:6,b:5", embedding_dim=4, model_dir=str(tmp_path)))
    msg = str(err.value)
    assert msg.startswith(f"PAIRSIEVE_MODEL_DIR = '{tmp_path}': cannot load its LATEST "
                          "checkpoint") and "\n" not in msg


def test_start_service_checks_before_any_side_effect(monkeypatch):
    import service.runtime as runtime

    _no_cuda(monkeypatch)
    touched = []
    monkeypatch.setattr(runtime, "EmbeddedBroker", lambda *a, **k: touched.append("broker"))
    monkeypatch.setattr(runtime, "create_topics", lambda *a, **k: touched.append("topics"))
    monkeypatch.setattr(runtime, "start_metrics_server", lambda *a, **k: touched.append("port"))
    with pytest.raises(SettingsError, match="PAIRSIEVE_MODEL_DIR"):  # needs the machine
        asyncio.run(runtime.start_service(Settings(model_dir="/etc/passwd/models")))
    assert touched == []


# ----------------------------------------------------------------------------- CLI


def _serve_fails(monkeypatch, capsys, argv, env=None):
    import service.runtime as runtime

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)

    async def never(settings):  # pragma: no cover - reached only if a check is missing
        raise AssertionError("the service was started")

    monkeypatch.setattr(runtime, "serve_forever", never)
    rc = main(["serve", *argv])
    err = capsys.readouterr().err
    return rc, err.splitlines()


@pytest.mark.parametrize("argv,env,expected", [
    (["--device", "gpu"], {}, "pairsieve: error: PAIRSIEVE_DEVICE (--device) = 'gpu': expected "
                              "cpu, cuda, cuda:N or auto (or unset)"),
    ([], {"PAIRSIEVE_DEVICE": "gpu"}, "PAIRSIEVE_DEVICE (--device) = 'gpu'"),
    (["--budget-total", "-5"], {}, "PAIRSIEVE_BUDGET_TOTAL (--budget-total) = -5: expected -1 "
                                   "(unlimited) or an integer >= 0"),
    ([], {"PAIRSIEVE_BUDGET_TOTAL": "lots"}, "PAIRSIEVE_BUDGET_TOTAL = 'lots': expected an "
                                             "integer"),
    (["--grpc-port", "99999"], {}, "PAIRSIEVE_GRPC_PORT (--grpc-port) = 99999"),
    (["--grpc-port", "7000", "--metrics-port", "7000"], {}, "are both 7000"),
    ([], {"PAIRSIEVE_METRICS_PORT": "50051"}, "are both 50051"),
    (["--index-size", "0"], {}, "PAIRSIEVE_INDEX_SIZE (--index-size) = 0: expected an integer "
                                ">= 1"),
    (["--normalization", "minmax"], {}, "PAIRSIEVE_NORMALIZATION (--normalization) = 'minmax'"),
    ([], {"PAIRSIEVE_QUOTA_MIN_SHARE": "0.9"}, "PAIRSIEVE_QUOTA_MIN_SHARE"),
    (["--target-rate", "abc"], {}, "--target-rate = 'abc': expected a number"),
    (["--model-dir", "/etc/passwd/m"], {}, "PAIRSIEVE_MODEL_DIR (--model-dir) = '/etc/passwd/m'"),
    ([], {"PAIRSIEVE_TLS_CERT_FILE": "/nonexistent/c.pem",
          "PAIRSIEVE_TLS_KEY_FILE": "/nonexistent/k.pem"}, "PAIRSIEVE_TLS_CERT_FILE"),
])
def test_serve_with_a_bad_value_exits_2_with_one_line(monkeypatch, capsys, argv, env, expected):
    _no_cuda(monkeypatch)
    for name in list(__import__("os").environ):
        if name.startswith("PAIRSIEVE_"):
            monkeypatch.delenv(name)
    rc, lines = _serve_fails(monkeypatch, capsys, argv, env)
    assert rc == 2
    n_bad = 2 if "TLS_CERT" in expected else 1  # both missing TLS files are named
    assert len(lines) == n_bad, lines
    assert all(line.startswith("pairsieve: error: ") for line in lines)
    assert expected in lines[0]


def test_serve_model_dir_that_is_a_file_exits_2(monkeypatch, capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    rc, lines = _serve_fails(monkeypatch, capsys, ["--model-dir", str(f)])
    assert rc == 2 and lines == [f"pairsieve: error: PAIRSIEVE_MODEL_DIR (--model-dir) = "
                                 f"'{f}': exists but is not a directory"]


def test_serve_help_explains_every_setting():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in fields(Settings)}
    for f in fields(Settings):
        text = actions[f.name].help
        assert Settings.env_name(f.name) in text and "default" in text, f.name
        assert len(text.split(" (env ")[0]) > 10, f"{f.name}: no meaning in --help"
    serve.format_help()  # every help string formats (no stray %)


def test_cache_half_life_zero_turns_the_decay_off():
    assert Settings().selector_config().cache_half_life == SelectorConfig().cache_half_life
    assert Settings(cache_half_life=0).selector_config().cache_half_life is None
    assert Settings(cache_half_life=250).selector_config().cache_half_life == 250



def test_the_micro_batch_idle_gap_must_fit_in_its_time_bound():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"PAIRSIEVE_BATCH_IDLE_SECONDS": "0.2",
                           "PAIRSIEVE_MAX_WAIT_SECONDS": "0.1"})
    assert err.value.errors == [
        "PAIRSIEVE_BATCH_IDLE_SECONDS (--batch-idle-seconds) = 0.2 is longer than "
        "PAIRSIEVE_MAX_WAIT_SECONDS (--max-wait-seconds) = 0.1: expected idle <= the time bound"]
    s = Settings.from_env({"PAIRSIEVE_BATCH_IDLE_SECONDS": "0.1",
                           "PAIRSIEVE_MAX_WAIT_SECONDS": "0.1"})
    assert (s.batch_idle_seconds, s.max_wait_seconds) == (0.1, 0.1)
    assert (Settings().batch_idle_seconds, Settings().max_wait_seconds) == (0.002, 0.05)
