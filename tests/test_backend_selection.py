"""Backend selection, lazy vendor imports, the peak-FLOPS table, and the vendor health-tool
parsers (fed sample output written here, so they run without the hardware)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from suanli.backends import BACKENDS, PROBE_ORDER, AcceleratorUnavailable, backend_class, get_accelerator, probe_all, reset_selection
from suanli.backends.base import DeviceHealth
from suanli.backends.tool_output import parse_bytes, parse_number, remap_to_visible
from suanli.backends.cuda import CUDAAccelerator, nvml_readings
from suanli.backends.mlu import parse_cnmon_info
from suanli.backends.musa import parse_mthreads_gmi
from suanli.backends.npu import NPUAccelerator, parse_npu_smi
from suanli.backends.peak_flops import PEAK_TABLE, TFLOPS, lookup_peak_flops, match_row
from suanli.backends.rocm import ROCmAccelerator, parse_hy_smi, parse_rocm_smi_json
from suanli.backends.xpu import parse_xpu_smi_dump

ROOT = Path(__file__).resolve().parents[1]
VENDOR_MODULES = ("torch_npu", "torch_mlu", "torch_musa", "pynvml", "apex")


@pytest.fixture(autouse=True)
def _fresh_selection():
    reset_selection()
    yield
    reset_selection()


# ---- selection ----

@pytest.mark.parametrize("value", ["cpu", " CPU "])
def test_env_var_selects_cpu(monkeypatch, value):
    monkeypatch.setenv("SUANLI_ACCELERATOR", value)
    assert get_accelerator().name == "cpu"


def test_unknown_name_lists_the_choices(monkeypatch):
    monkeypatch.setenv("SUANLI_ACCELERATOR", "tpu")
    with pytest.raises(AcceleratorUnavailable) as err:
        get_accelerator()
    msg = str(err.value)
    assert "tpu" in msg and "SUANLI_ACCELERATOR" in msg
    assert all(name in msg for name in BACKENDS)


@pytest.mark.parametrize("name,package", [("npu", "torch_npu"), ("mlu", "torch_mlu"), ("musa", "torch_musa")])
def test_missing_vendor_package_is_named(name, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(AcceleratorUnavailable, match=package):
        get_accelerator(name)


def test_cuda_on_a_cpu_torch_says_why():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    with pytest.raises(AcceleratorUnavailable, match="without CUDA"):
        get_accelerator("cuda")


def test_rocm_build_belongs_to_rocm_not_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    av = CUDAAccelerator.probe()
    assert not av.available and "rocm" in av.reason
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    av = ROCmAccelerator.probe()
    assert not av.available and "not a ROCm build" in av.reason


def test_no_env_var_probes_then_falls_back_to_cpu(monkeypatch):
    monkeypatch.delenv("SUANLI_ACCELERATOR", raising=False)
    available = {r["name"] for r in probe_all() if r["available"]}
    expected = next((n for n in PROBE_ORDER if n in available), "cpu")
    acc = get_accelerator()
    assert acc.name == expected
    assert get_accelerator() is acc  # cached


def test_probe_all_lists_every_backend():
    rows = probe_all()
    assert [r["name"] for r in rows] == list(BACKENDS)
    assert len(rows) == 7
    for r in rows:
        assert isinstance(r["available"], bool) and isinstance(r["reason"], str) and r["reason"]
    assert next(r for r in rows if r["name"] == "cpu")["available"]


def test_import_loads_no_vendor_package():
    code = ("import json, sys, suanli, suanli.backends\n"
            "import suanli.backends.cuda, suanli.backends.rocm, suanli.backends.npu\n"
            "import suanli.backends.mlu, suanli.backends.musa, suanli.backends.xpu\n"
            f"print(json.dumps([m for m in {VENDOR_MODULES!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_cuda_or_nccl_outside_backends():
    pattern = re.compile(r"torch\.cuda|\.cuda\(|[\"']nccl[\"']")
    offenders = []
    for folder in ("suanli", "infra", "fault", "bench", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "ask the accelerator object instead:\n" + "\n".join(offenders)


# ---- peak FLOPS table ----

@pytest.mark.parametrize("device_name,label,bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA H800", "H800 SXM", 989.4),
    ("NVIDIA H800 PCIe", "H800 PCIe", 756.5),
    ("NVIDIA H20", "H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA A800-SXM4-80GB", "A800", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("AMD Instinct MI300X", "MI300X", 1307.4),
    ("AMD Instinct MI250X", "MI250X (per GCD)", 191.5),
    ("AMD Instinct MI250", "MI250 (per GCD)", 181.05),
    ("MTT S4000", "MTT S4000", 100.0),
])
def test_known_devices_map_to_dense_figures(device_name, label, bf16):
    assert match_row(device_name).label == label
    assert lookup_peak_flops(device_name, "bf16") == pytest.approx(bf16 * TFLOPS)
    assert lookup_peak_flops(device_name, torch.bfloat16) == pytest.approx(bf16 * TFLOPS)


def test_h100_variants_differ():
    sxm = lookup_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert lookup_peak_flops("NVIDIA H100 PCIe", "bf16") < sxm
    assert lookup_peak_flops("NVIDIA H100 NVL", "bf16") < sxm
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == pytest.approx(66.9 * TFLOPS)
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", "tf32") == pytest.approx(494.7 * TFLOPS)


@pytest.mark.parametrize("device_name", [
    "Some Future Accelerator", "NVIDIA L40", "Intel(R) Data Center GPU Max 1550",
    "NVIDIA RTX A1000 Laptop GPU", "NVIDIA GH200 480GB", "Ascend910B3", "Ascend910_9391",
    # MI250 and MI250X share a name on some ROCm releases: the table must not guess.
    "AMD Instinct MI250X/MI250",
    # A first-generation SoC name in CANN, not an A2 910B: must not pick up any figure.
    "Ascend910B",
])
def test_unknown_or_ambiguous_names_have_no_peak(device_name):
    assert lookup_peak_flops(device_name, "bf16") is None


def test_unknown_dtype_has_no_peak():
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", "fp4") is None
    assert lookup_peak_flops("Ascend910A", "bf16") is None  # the first 910 has no BF16
    assert lookup_peak_flops("Ascend910A", "fp16") == pytest.approx(256 * TFLOPS)


def test_no_row_is_a_sparsity_figure():
    sparse_headlines = {3958.0, 3957.8, 1979.0, 1978.9, 1671.0, 1513.0, 624.0, 733.0, 1466.0, 2614.9, 5229.8}
    for row in PEAK_TABLE:
        assert row.tflops.get("bf16") not in sparse_headlines, row.label
        if row.label.startswith(("H1", "H2", "H8", "A1", "A8", "L40")):
            assert row.tflops["bf16"] < 1000, row.label  # dense Hopper tops out at 989.4
            assert row.tflops["bf16"] / row.tflops["tf32"] == pytest.approx(2.0, rel=0.02), row.label
        if "fp8" in row.tflops and "bf16" in row.tflops:
            assert row.tflops["fp8"] == pytest.approx(2 * row.tflops["bf16"], rel=0.02), row.label


def test_table_rows_are_well_formed():
    for row in PEAK_TABLE:
        re.compile(row.pattern)
        assert row.label and row.source and len(row.source) > 20
        assert row.tflops and set(row.tflops) <= {"fp32", "tf32", "bf16", "fp16", "fp8"}
        assert all(v > 0 for v in row.tflops.values())


def test_rocm_resolves_the_shared_mi250_name(monkeypatch):
    acc = ROCmAccelerator()
    monkeypatch.setattr(ROCmAccelerator, "device_name", lambda self, index=0: "AMD Instinct MI250X/MI250")
    for cus, bf16 in ((110, 191.5), (104, 181.05)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, n=cus: SimpleNamespace(multi_processor_count=n))
        assert acc.peak_flops("bf16") == pytest.approx(bf16 * TFLOPS)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=96))
    assert acc.peak_flops("bf16") is None


# ---- vendor kernels fall back to the reference off their device ----

@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "cpu"])
def test_vendor_kernels_fall_back_on_cpu_tensors(name):
    acc = backend_class(name)()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(acc.attention(q, k, v, causal=True), ref, rtol=1e-5, atol=1e-5)
    x, w = torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(acc.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)


def test_npu_optimizer_needs_npu_params():
    acc = NPUAccelerator()
    params = [torch.nn.Parameter(torch.randn(4))]
    assert acc._vendor_fused_adamw(params, lr=1e-3) is None
    opt = acc.fused_adamw(params, lr=1e-3)  # falls through to torch's AdamW
    assert isinstance(opt, torch.optim.AdamW)


def test_hccl_timeouts_stay_below_the_process_group_timeout():
    acc = NPUAccelerator()
    assert acc.watchdog_env() == {"HCCL_ASYNC_ERROR_HANDLING": "1"}
    env = acc.watchdog_env(1800.0)
    connect, exec_ = int(env["HCCL_CONNECT_TIMEOUT"]), int(env["HCCL_EXEC_TIMEOUT"])
    assert 120 <= connect <= 7200 and connect + 20 < 1800
    assert 68 <= exec_ < 1800


# ---- health-tool parsers ----

NPU_SMI_910B = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc2                 Version: 24.1.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 4     910B3               | OK            | 97.1        41                0    / 0             |
| 0                         | 0000:81:00.0  | 63          0    / 0          40120/ 65536         |
+===========================+===============+====================================================+
| 5     910B3               | Warning       | 101.4       44                0    / 0             |
| 0                         | 0000:82:00.0  | 71          0    / 0          40342/ 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 4       0                 | 81233         | python3                  | 40001                   |
+===========================+===============+====================================================+
"""

NPU_SMI_310P = """\
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 3       310P3                 | OK              | NA           52                0     / 0             |
| 0       1                     | NA              | 12           2100 / 21527                            |
+===============================+=================+======================================================+
"""


def test_parse_npu_smi_910b():
    r = parse_npu_smi(NPU_SMI_910B)
    assert [x.index for x in r] == [4, 5]
    a = r[0]
    assert (a.name, a.power_w, a.temperature_c, a.utilization_pct) == ("910B3", 97.1, 41.0, 63.0)
    assert a.memory_used_bytes == 40120 * 2**20 and a.memory_total_bytes == 65536 * 2**20
    assert a.source == "npu-smi" and a.ecc_errors_corrected is None
    assert [x.index for x in remap_to_visible(r, None)] == [0, 1]


def test_parse_npu_smi_with_device_column_and_na():
    (r,) = parse_npu_smi(NPU_SMI_310P)
    assert r.index == 1 and r.power_w is None and r.temperature_c == 52.0
    assert r.memory_used_bytes == 2100 * 2**20 and r.memory_total_bytes == 21527 * 2**20


ROCM_SMI_JSON = json.dumps({
    "card0": {"Temperature (Sensor edge) (C)": "38.0", "Temperature (Sensor junction) (C)": "46.0",
              "Temperature (Sensor memory) (C)": "40.0", "Current Socket Graphics Package Power (W)": "612.0",
              "GPU use (%)": "97", "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "180000000000"},
    "card1": {"Temperature (Sensor edge) (C)": "35.0", "Average Graphics Package Power (W)": "88.0",
              "GPU use (%)": "0", "VRAM Total Memory (B)": "68702699520", "VRAM Total Used Memory (B)": "11710464"},
    "system": {"Driver version": "6.8.5"},
})


def test_parse_rocm_smi_json():
    a, b = parse_rocm_smi_json(ROCM_SMI_JSON)
    assert (a.index, a.temperature_c, a.power_w, a.utilization_pct) == (0, 46.0, 612.0, 97.0)
    assert a.memory_total_bytes == 205822885888 and a.memory_used_bytes == 180000000000
    assert (b.index, b.temperature_c, b.power_w) == (1, 35.0, 88.0)  # no junction sensor: edge
    assert parse_rocm_smi_json("not json") == []


HY_SMI = """\
============================ System Management Interface =============================
======================================================================================
DCU     Temp     AvgPwr     Perf     PwrCap     VRAM%      DCU%      Mode
0       51.0C    142.0W     auto     400.0W     37%        88%       Normal
1       49.0C    139.0W     auto     400.0W     36%        91%       Normal
======================================================================================
=================================== End of SMI Log ===================================
"""


def test_parse_hy_smi():
    a, b = parse_hy_smi(HY_SMI)
    assert (a.index, a.temperature_c, a.power_w, a.utilization_pct) == (0, 51.0, 142.0, 88.0)
    assert (b.index, b.utilization_pct) == (1, 91.0)
    assert a.source == "hy-smi"


CNMON_INFO = """\
Card 0
Product Name                   : MLU370-X4
Firmware                       : v1.1.4
Utilization
    MLU Average                : 42 %
    MLU 00                     : 40 %
    MLU 01                     : 44 %
Physical Memory Usage
    Total                      : 24576 MiB
    Used                       : 9000 MiB
    Free                       : 15576 MiB
Virtual Memory Usage
    Total                      : 1048576 MiB
    Used                       : 10 MiB
Power Usage
    Power                      : 118 W
    Power Cap                  : 150 W
Temperature
    Board                      : 47 C
    Cluster 0                  : 55 C
ECC
    One Bit Error              : 3
    Multiple Bits Error        : 0
Card 1
Product Name                   : MLU370-X4
Utilization
    MLU Average                : N/A
Physical Memory Usage
    Total                      : 24576 MiB
    Used                       : 120 MiB
Temperature
    Board                      : 39 C
"""


def test_parse_cnmon_info():
    a, b = parse_cnmon_info(CNMON_INFO)
    assert (a.index, a.name, a.temperature_c, a.power_w, a.utilization_pct) == (0, "MLU370-X4", 47.0, 118.0, 42.0)
    assert a.memory_total_bytes == 24576 * 2**20 and a.memory_used_bytes == 9000 * 2**20
    assert (a.ecc_errors_corrected, a.ecc_errors_uncorrected) == (3, 0)
    assert (b.index, b.utilization_pct, b.power_w, b.ecc_errors_corrected) == (1, None, None, None)
    assert b.memory_used_bytes == 120 * 2**20


MTHREADS_GMI_Q = """\
==============MTGMI LOG==============
Timestamp                          : Tue Mar  4 10:12:03 2025
Driver Version                     : 2.7.0
Attached GPUs                      : 2
GPU 00000000:4F:00.0
    Product Name                   : MTT S4000
    Index                          : 0
    FB Memory Usage
        Total                      : 49152 MiB
        Used                       : 30211 MiB
        Free                       : 18941 MiB
    Utilization
        Gpu                        : 87 %
        Memory                     : 40 %
    Temperature
        GPU Current Temp           : 61 C
    Power Readings
        Power Draw                 : 301.5 W
GPU 00000000:52:00.0
    Product Name                   : MTT S4000
    Index                          : 1
    FB Memory Usage
        Total                      : 49152 MiB
        Used                       : 0 MiB
    Utilization
        Gpu                        : 0 %
    Temperature
        GPU Current Temp           : 38 C
    Power Readings
        Power Draw                 : N/A
"""


def test_parse_mthreads_gmi():
    a, b = parse_mthreads_gmi(MTHREADS_GMI_Q)
    assert (a.index, a.name, a.temperature_c, a.power_w, a.utilization_pct) == (0, "MTT S4000", 61.0, 301.5, 87.0)
    assert a.memory_total_bytes == 49152 * 2**20 and a.memory_used_bytes == 30211 * 2**20
    assert (b.index, b.power_w, b.memory_used_bytes) == (1, None, 0)


XPU_SMI_DUMP = """\
Timestamp, DeviceId, GPU Utilization (%), GPU Power (W), GPU Core Temperature (Celsius Degree), GPU Memory Used (MiB), GPU Memory Errors Correctable, GPU Memory Errors Uncorrectable
06:14:46.000,    0, 93.50, 412.61, 61.00, 51200.25, 0, 0
06:14:46.000,    1, 0.00, 95.20, 33.00, 12.50, 2, N/A
"""


def test_parse_xpu_smi_dump():
    a, b = parse_xpu_smi_dump(XPU_SMI_DUMP)
    assert (a.index, a.utilization_pct, a.power_w, a.temperature_c) == (0, 93.5, 412.61, 61.0)
    assert a.memory_used_bytes == int(51200.25 * 2**20)
    assert (b.ecc_errors_corrected, b.ecc_errors_uncorrected) == (2, None)
    assert parse_xpu_smi_dump("xpu-smi: command failed") == []


class _FakeNVML(SimpleNamespace):
    """Enough of pynvml for nvml_readings: GPU 1 has no ECC support, like a consumer card."""

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA L40S"

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 55 + h

    def nvmlDeviceGetPowerUsage(self, h):
        return 612_500

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=99, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=70 * 2**30, total=80 * 2**30, free=10 * 2**30)

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        if h == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 7 if kind == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else 0


def test_nvml_readings():
    a, b = nvml_readings(_FakeNVML(), [(0, 0), (1, 1)])
    assert (a.name, a.temperature_c, a.power_w, a.utilization_pct) == ("NVIDIA H100 80GB HBM3", 55.0, 612.5, 99.0)
    assert (a.memory_used_bytes, a.memory_total_bytes) == (70 * 2**30, 80 * 2**30)
    assert (a.ecc_errors_corrected, a.ecc_errors_uncorrected) == (7, 0)
    assert (b.index, b.name, b.ecc_errors_corrected, b.ecc_errors_uncorrected) == (1, "NVIDIA L40S", None, None)
    assert a.source == "nvml"


def test_remap_to_visible():
    def readings():
        return [DeviceHealth(index=i, name=f"phys{i}") for i in (2, 3, 6)]
    assert [r.index for r in remap_to_visible(readings(), None)] == [0, 1, 2]
    got = remap_to_visible(readings(), "6,2")
    assert [(r.index, r.name) for r in got] == [(0, "phys6"), (1, "phys2")]
    assert remap_to_visible(readings(), "5") == []


def test_number_and_byte_parsing():
    assert parse_number("58 C") == 58.0 and parse_number("N/A") is None and parse_number(None) is None
    assert parse_bytes("49152 MiB") == 49152 * 2**20
    assert parse_bytes("64 GB") == 64 * 2**30  # tools write GB and mean GiB
    assert parse_bytes("N/A") is None
    assert math.isclose(parse_number("-3.5 W"), -3.5)
