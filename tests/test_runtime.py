"""runtime.py: the one device and precision rule (cuda, then mps, then cpu; the dtype and fast paths each
supports), checked with the availability of each device patched, and the training loop and the inference scripts
both following it. No Mac and no GPU here: the choice is tested, the devices themselves are not."""
from types import SimpleNamespace

import pytest
import torch

import inference
import runtime
from cli import UserError


@pytest.fixture
def machine(monkeypatch):
    """A machine with the devices asked for: machine(cuda=..., bf16=..., mps=..., macos14=...)."""
    def patch(cuda=False, bf16=True, mps=False, macos14=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    return patch


@pytest.mark.parametrize("devices,expected", [
    (dict(cuda=True, mps=True), "cuda"),  # CUDA first
    (dict(mps=True), "mps"),              # then Apple Silicon
    (dict(), "cpu"),
])
def test_auto_picks_cuda_then_mps_then_cpu(machine, devices, expected):
    machine(**devices)
    assert runtime.choose_device("auto") == torch.device(expected)


@pytest.mark.parametrize("devices,device,expected", [
    (dict(cuda=True, bf16=True), "cuda", torch.bfloat16),
    (dict(cuda=True, bf16=False), "cuda", torch.float16),  # RTX 20xx: fp16, with a gradient scaler
    (dict(mps=True, macos14=True), "mps", torch.bfloat16),
    (dict(mps=True, macos14=False), "mps", torch.float16),
    (dict(), "cpu", torch.float32),  # bf16 matmuls without AVX-512 are ~100x slower
])
def test_auto_precision_is_what_the_device_runs_best(machine, devices, device, expected):
    machine(**devices)
    assert runtime.choose_dtype(runtime.choose_device(device), "auto") == expected


def test_a_device_the_machine_lacks_or_a_bad_name_is_one_line(machine):
    machine()
    for device, message in (("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                            ("mps", "mps is not available"), ("gpu", "use auto, cpu, cuda, cuda:N or mps")):
        with pytest.raises(UserError, match=message):
            runtime.choose_device(device)
    with pytest.raises(UserError, match="--dtype float8: use auto, float32, bfloat16, float16"):
        runtime.choose_dtype(torch.device("cpu"), "float8")


def test_fp16_gets_a_gradient_scaler_and_the_others_none():
    assert runtime.Runtime("cpu", "float16").scaler.is_enabled()
    assert not runtime.Runtime("cpu", "bfloat16").scaler.is_enabled()
    cpu = runtime.Runtime("cpu", "auto")
    assert cpu.dtype == torch.float32 and not cpu.scaler.is_enabled()


def test_the_fast_paths_follow_the_device():
    """torch.compile where PyTorch supports it (not mps: a prototype), fused AdamW on the GPUs."""
    assert runtime.COMPILES == {"cuda": True, "mps": False, "cpu": True}
    assert runtime.FUSED_ADAMW == {"cuda": True, "mps": True, "cpu": False}


def test_compiling_on_mps_warns_once_and_trains_eagerly(capsys):
    model = torch.nn.Linear(2, 2)
    mps = SimpleNamespace(device=torch.device("mps"))
    assert runtime.compiled_or_eager(model, {}, None, mps) is model
    assert capsys.readouterr().err.startswith("warning: torch.compile does not work here (its mps backend is a "
                                              "prototype in PyTorch)")


def test_inference_follows_the_same_rule(machine, monkeypatch):
    machine(mps=True)
    seen = {}

    def record(path, device="cpu"):  # stops load_for_inference once the device is chosen
        seen["device"] = device
        raise KeyboardInterrupt
    monkeypatch.setattr(inference, "load_checkpoint", record)
    with pytest.raises(KeyboardInterrupt):
        inference.load_for_inference(inference.LoadSettings())
    assert seen["device"] == torch.device("mps")


def test_adamw_is_fused_where_the_table_says():
    import train
    model, cfg = torch.nn.Linear(4, 4), train.TrainConfig(device="cpu")
    for kind in ("cpu", "mps"):  # the mps run's parameters stay on the CPU here, which has the fused kernel too
        rt = SimpleNamespace(device=torch.device(kind), scaler=torch.amp.GradScaler("cpu", enabled=False))
        (adamw,) = train.make_optimizers(model, cfg, rt)
        assert bool(adamw.defaults["fused"]) == runtime.FUSED_ADAMW[kind]
