"""`unet-export doctor`: every row present with this machine's real values, exit 0 whatever is
missing; an absent TensorRT or OpenVINO names its install line; lock drift and a check's own
failure are rows, never a crash."""

import json
import platform
import shutil
import sys
from importlib import metadata

import pytest
import torch
from typer.testing import CliRunner

from unet_export import lockcheck
from unet_export.flows import doctor
from unet_export.cli.main import app
from unet_export.flows.cpp_check import required_cxx_standard

runner = CliRunner()
ALWAYS = ["python", "platform", "cpu", "torch", "cuda", "cudnn", "tensorrt", "onnxruntime", "openvino", "smp", "c++ standard",
          "cmake", "c++", "cuda toolkit", "lock"]  # fmt: skip
TORCH_2_14 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def doctor_rows() -> dict[str, dict]:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return doctor_rows()


def test_table_lists_every_check_and_exits_zero():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "unet-export doctor" in result.stdout and "Traceback" not in result.output
    for name in ALWAYS:
        assert f"│ {name} " in result.stdout, name


def test_every_row_has_a_known_status(rows):
    assert set(ALWAYS) <= set(rows)
    assert all(row["status"] in ("ok", "missing", "warn") and row["detail"] for row in rows.values())


def test_python_cpu_and_torch_rows_are_real(rows):
    assert rows["python"]["detail"].startswith(platform.python_version()) and sys.executable in rows["python"]["detail"]
    assert rows["platform"]["detail"] == platform.platform()
    assert "physical cores" in rows["cpu"]["detail"]
    assert rows["torch"] == {"name": "torch", "status": "ok", "detail": torch.__version__}


def test_cuda_gpu_and_cudnn_rows_match_torch(rows):
    if torch.cuda.is_available():
        assert rows["cuda"]["status"] == "ok" and torch.version.cuda in rows["cuda"]["detail"]
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            detail = rows[f"gpu {index}"]["detail"]
            assert torch.cuda.get_device_name(index) in detail and f"compute capability {major}.{minor}" in detail
    else:
        assert rows["cuda"]["status"] == "missing" and rows["gpu"]["status"] == "missing"
    if torch.backends.cudnn.is_available():
        major = torch.backends.cudnn.version() // 10000  # cuDNN 9: major*10000 + minor*100 + patch
        assert rows["cudnn"]["status"] == "ok" and rows["cudnn"]["detail"].startswith(f"{major}.")


def test_runtime_rows_are_real(rows):
    import onnxruntime
    import openvino

    ort = rows["onnxruntime"]["detail"]
    assert ort.startswith(onnxruntime.__version__) and "CPUExecutionProvider" in ort
    assert rows["openvino"]["status"] == "ok" and "CPU" in rows["openvino"]["detail"].split("devices: ")[1].split(", ")
    assert rows["openvino"]["detail"].startswith(openvino.__version__.split("-")[0])


def test_toolchain_rows(rows):
    assert rows["c++ standard"]["detail"].startswith(f"C++{required_cxx_standard()},")
    for tool in ("cmake", "c++"):
        path = shutil.which(tool)
        assert (rows[tool]["status"] != "missing") == (path is not None)
        if path:
            assert path in rows[tool]["detail"]
    if torch.version.cuda is None:
        assert rows["cuda toolkit"]["detail"] == "not needed: torch is a CPU-only build"


def test_missing_cmake_and_an_old_compiler_say_why(tmp_path, monkeypatch):
    fake = tmp_path / "c++"  # answers --version, fails any compile as a pre-C++20 g++ would
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "c++ (Fake) 9.1.0"; exit 0; }\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    rows = doctor_rows()
    assert rows["cmake"]["status"] == "missing" and "apt-get install cmake g++" in rows["cmake"]["detail"]
    assert rows["c++"]["status"] == "warn" and "c++ (Fake) 9.1.0" in rows["c++"]["detail"]
    assert f"does not compile C++{required_cxx_standard()}" in rows["c++"]["detail"]


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU build of torch needs no CUDA toolkit")
def test_missing_cuda_toolkit_is_reported_with_cmake_args_reason(monkeypatch):
    from unet_export.flows import cpp_check as cpp
    from unet_export.errors import UserError

    def no_toolkit():
        raise UserError("torch is a CUDA build, so building against its libtorch needs the CUDA toolkit")

    monkeypatch.setattr(cpp, "cmake_args", no_toolkit)
    row = doctor_rows()["cuda toolkit"]
    assert row["status"] == "missing" and "needs the CUDA toolkit" in row["detail"]


def test_lock_row_says_the_environment_matches(rows):
    expected = "ok" if not lockcheck.drift() else "warn"
    assert rows["lock"]["status"] == expected and "requirements/lock.txt" in rows["lock"]["detail"]


def test_absent_tensorrt_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # 'import tensorrt' raises ImportError
    row = doctor_rows()["tensorrt"]
    assert row["status"] == "missing" and 'pip install "unet-export[trt]"' in row["detail"]


def test_tensorrt_without_a_gpu_cannot_build_engines(monkeypatch):
    from tests.fake_tensorrt import make_fake_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version="10.9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    row = doctor_rows()["tensorrt"]
    assert row["status"] == "warn" and "10.9.0" in row["detail"] and "engines cannot be built" in row["detail"]


def test_smp_row_names_its_version_or_the_install_line(monkeypatch):
    import segmentation_models_pytorch as smp

    row = doctor_rows()["smp"]
    assert row["status"] == "ok"
    assert row["detail"] == f"segmentation_models_pytorch {smp.__version__}, {len(smp.MODEL_ARCHITECTURES_MAPPING)} architectures"
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    row = doctor_rows()["smp"]
    assert row["status"] == "missing" and 'pip install "unet-export[smp]"' in row["detail"]


def test_absent_openvino_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    row = doctor_rows()["openvino"]
    assert row["status"] == "missing" and 'pip install "unet-export[openvino]"' in row["detail"]


def test_lock_drift_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    lock = tmp_path / "requirements" / "lock.txt"
    lock.parent.mkdir()
    lock.write_text("torch==0.0.1\nnot-a-real-package==1.0\n")
    monkeypatch.setattr(lockcheck, "LOCK", lock)
    row = doctor_rows()["lock"]
    assert row["status"] == "warn"
    assert f"torch {metadata.version('torch')} is installed, the lock says 0.0.1" in row["detail"]
    assert "not-a-real-package 1.0 is locked but not installed" in row["detail"]


def test_without_a_lock_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(lockcheck, "LOCK", tmp_path / "lock.txt")
    row = doctor_rows()["lock"]
    assert row["status"] == "ok" and row["detail"] == "no lock file (installed from a package)"


def test_a_check_that_raises_becomes_a_row(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    def unimportable():
        import not_a_real_module  # noqa: F401

    monkeypatch.setattr(doctor, "CHECKS", [("broken", broken), ("unimportable", unimportable)])
    rows = doctor_rows()
    assert rows["broken"]["status"] == "warn"
    assert rows["broken"]["detail"] == "the check failed: RuntimeError: driver exploded"
    assert rows["unimportable"]["status"] == "missing" and "not_a_real_module" in rows["unimportable"]["detail"]


# --- required_cxx_standard: the -std libtorch's headers demand, read from the headers ---


def test_installed_torch_requires_cxx20():
    assert TORCH_2_14, "torch >= 2.14 is locked; its ATen.h stops below C++20"
    assert required_cxx_standard() == 20


OLD_ATEN = ("#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < 201703L\n"
            "#error C++17 or later compatible compiler is required to use ATen.\n#endif\n")  # fmt: skip
NEW_ATEN = OLD_ATEN.replace("201703L", "202002L").replace("C++17", "C++20")
OLD_C10 = ("#if (defined(_MSC_VER) && (!defined(_MSVC_LANG) || _MSVC_LANG < 201703L)) || \\\n"
           "    (!defined(_MSC_VER) && __cplusplus < 201703L)\n"
           "#error You need C++17 to compile PyTorch\n#endif\n")  # fmt: skip
UNGUARDED = "#pragma once\n#include <ATen/Context.h>\n#if __cplusplus < 202002L\nnamespace polyfill {}\n#endif\n"


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"ATen/ATen.h": NEW_ATEN}, 20),
        ({"ATen/ATen.h": OLD_ATEN}, 17),
        ({"ATen/ATen.h": UNGUARDED, "c10/util/C++17.h": OLD_C10}, 17),  # no guard in ATen: c10's
        ({"ATen/ATen.h": UNGUARDED}, 17),  # a version check without #error is not a requirement
        ({}, 17),
    ],
)
def test_required_cxx_standard_reads_the_guard(tmp_path, headers, expected):
    for name, text in headers.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert required_cxx_standard(tmp_path) == expected
