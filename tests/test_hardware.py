"""The precision decision: bf16 only where the chip does it natively, with both answers mocked."""

import pytest
import torch

from preftune.hardware import CpuInfo, bf16_slowdown, choose_precision, cpu_info, matmul_gflops, parse_cpuinfo

CPU = torch.device("cpu")
AVX2_EPYC = CpuInfo("AMD EPYC 7B13", frozenset({"avx", "avx2", "fma"}))
ZEN4_EPYC = CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx512f", "amx_bf16", "amx_tile"}))


def never(*_):
    raise AssertionError("the slowdown must not be measured here")


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme avx avx2 fma
processor\t: 1
model name\t: something else
flags\t\t: avx512_bf16
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes bf16 i8mm
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_the_first_processor():
    info = parse_cpuinfo(X86_CPUINFO)
    assert info.model == "AMD EPYC 7B13"
    assert info.flags == frozenset({"fpu", "vme", "avx", "avx2", "fma"})
    assert not info.native_bf16  # the second processor's flag is not read


def test_parse_cpuinfo_arm_features():
    info = parse_cpuinfo(ARM_CPUINFO)
    assert info.native_bf16 and info.bf16_flags == ["bf16"]
    assert info.model  # falls back to the platform's name


def test_cpu_info_of_this_machine_has_a_name():
    info = cpu_info()
    assert isinstance(info.model, str) and info.model
    assert cpu_info("/nonexistent/cpuinfo").flags == frozenset()


@pytest.mark.parametrize("cpu", [ZEN4_EPYC, SAPPHIRE], ids=["avx512_bf16", "amx"])
def test_auto_on_native_bf16_cpu_is_bf16(cpu):
    choice = choose_precision("auto", "auto", CPU, cpu, slowdown=never)
    assert (choice.bf16, choice.fp16, choice.name, choice.warning) == (True, False, "bf16", None)
    assert cpu.model in choice.reason and "native bf16" in choice.reason


def test_auto_without_native_bf16_is_fp32():
    choice = choose_precision("auto", "auto", CPU, AVX2_EPYC, slowdown=never)
    assert (choice.bf16, choice.fp16, choice.name, choice.warning) == (False, False, "fp32", None)
    assert "no native bf16" in choice.reason and "AMD EPYC 7B13" in choice.reason


def test_explicit_bf16_without_native_bf16_runs_and_warns_with_the_measured_slowdown():
    choice = choose_precision(True, "auto", CPU, AVX2_EPYC, slowdown=lambda: 117.6)
    assert choice.bf16 and choice.name == "bf16"
    assert choice.warning is not None and "118x slower" in choice.warning and "AMD EPYC 7B13" in choice.warning


def test_explicit_bf16_with_native_bf16_does_not_warn():
    choice = choose_precision(True, False, CPU, ZEN4_EPYC, slowdown=never)
    assert choice.bf16 and choice.warning is None


@pytest.mark.parametrize("bf16", ["auto", False])
def test_fp16_true_wins_over_bf16_auto(bf16):  # bf16 and fp16 both true is a config error
    choice = choose_precision(bf16, True, CPU, ZEN4_EPYC, slowdown=never)
    assert (choice.bf16, choice.fp16) == (False, True)


def test_explicit_false_is_fp32_everywhere():
    for cpu in (AVX2_EPYC, ZEN4_EPYC):
        choice = choose_precision(False, False, CPU, cpu, slowdown=never)
        assert choice.name == "fp32"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    choice = choose_precision("auto", "auto", torch.device("cuda", 0), AVX2_EPYC, slowdown=never)
    assert choice.bf16 is supported and not choice.fp16
    assert ("H200" in choice.reason) is supported


def test_matmul_probe_measures_something():
    assert matmul_gflops(torch.float32, n=64, repeats=1) > 0
    assert bf16_slowdown() > 0


def tiny_run(model_dir, tmp_path, **extra):
    import json

    from preftune import train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": " yes.", "rejected": " no."}) + "\n"
                             for i in range(4)))  # fmt: skip
    out = tmp_path / "run"
    return train({"model_name_or_path": model_dir, "train_file": str(pairs), "max_steps": 1, "progress": False,
                  "output_dir": str(out), **extra})  # fmt: skip


@pytest.mark.parametrize("cpu", [AVX2_EPYC, ZEN4_EPYC], ids=["avx2", "avx512-bf16"])
def test_a_run_says_which_precision_auto_chose_and_records_the_cpu(tiny_model_dir, tmp_path, monkeypatch, capsys, cpu):
    """bf16: auto (the default) trains in fp32 on a CPU without native bf16 and in bf16 with it;
    the run's first lines say so and why, summary.json records the choice and the CPU."""
    monkeypatch.setattr("preftune.hardware.cpu_info", lambda *a: cpu)
    monkeypatch.setattr("preftune.hardware.bf16_slowdown", never)
    summary = tiny_run(tiny_model_dir, tmp_path)
    expected = "bf16" if cpu.native_bf16 else "fp32"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("data: ") and lines[1].startswith(f"precision: {expected} (bf16: auto, and the CPU")
    record = summary["precision"]
    assert record["name"] == expected and record["warning"] is None and "bf16: auto" in record["reason"]
    assert record["cpu"]["model"] == cpu.model and record["cpu"]["flags"] == " ".join(sorted(cpu.flags))
    assert record["cpu"]["native_bf16"] is cpu.native_bf16
    assert "torch" in summary["versions"] and "transformers" in summary["versions"]


def test_a_run_with_bf16_true_on_a_cpu_without_it_warns(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("preftune.hardware.cpu_info", lambda *a: AVX2_EPYC)
    monkeypatch.setattr("preftune.hardware.bf16_slowdown", lambda: 117.6)
    summary = tiny_run(tiny_model_dir, tmp_path, bf16=True)
    err = capsys.readouterr().err
    assert "precision: bf16 (bf16: true)" in err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "118x slower than fp32" in warning[0] and "AMD EPYC 7B13" in warning[0]
    assert summary["precision"]["name"] == "bf16" and "118x slower" in summary["precision"]["warning"]
