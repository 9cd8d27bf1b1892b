"""A test double of TensorRT's Python API, per major version (10.x, 11.x): exactly the names the builder
(unet_export/runtimes/tensorrt/build.py) and the runner (unet_export/runtimes/tensorrt/runner.py) use on that version, with
the real enum values. tests/runtimes/test_tensorrt_api.py holds it to the real bindings (tests/data/tensorrt_api.json):
each public name here exists in that version with the same kind and value, and the code uses each one.

Public names are TensorRT's; names starting with "_" are the tests' bookkeeping. Every public name read from
the fake (hasattr/getattr probes of missing names included) is logged in ``trt._used`` as (class, name).
It builds and runs nothing: an engine is the bytes b"PLAN...", a timing cache b"cache:<gpu>"."""

import enum
import itertools
import types

import torch

MODULE = "tensorrt"  # the owner name of module-level reads in trt._used


def _note(cls, name: str) -> None:
    """Log a read of ``name`` under the nearest fake class, unless the code's own subclass defines it."""
    for klass in type.__getattribute__(cls, "__mro__"):
        own = type.__getattribute__(klass, "__dict__")
        if "_trt_name" in own:
            own["_log"].add((own["_trt_name"], name))
            return
        if name in own:
            return  # e.g. the code's Logger.log


class _Meta(type):
    def __getattribute__(cls, name):
        if not name.startswith("_"):
            _note(cls, name)
        return super().__getattribute__(name)


class _EnumMeta(enum.EnumType):
    def __getattribute__(cls, name):
        if not name.startswith("_"):
            _note(cls, name)
        return super().__getattribute__(name)


class _IntEnum(enum.IntEnum, metaclass=_EnumMeta):
    """pybind11's enums in TensorRT are arithmetic: int(flag) is the value."""


class _Object(metaclass=_Meta):
    def __getattribute__(self, name):
        if not name.startswith("_") and name not in object.__getattribute__(self, "__dict__"):
            _note(type(self), name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        """Writes are logged too (layer.precision = ...). Like pybind11's objects, a fake object refuses a
        name its class lacks; the code's own subclass (its Logger) keeps its own attributes."""
        if not name.startswith("_"):
            cls = type(self)
            fake = "_trt_name" in type.__getattribute__(cls, "__dict__")
            defined = any(name in type.__getattribute__(k, "__dict__") for k in type.__getattribute__(cls, "__mro__"))
            if fake or defined:
                _note(cls, name)
            if fake and not defined:
                raise AttributeError(f"'{cls._trt_name}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


class _Module(types.ModuleType):
    def __getattribute__(self, name):
        if not name.startswith("_") or name == "__version__":
            types.ModuleType.__getattribute__(self, "_used").add((MODULE, name))
        return super().__getattribute__(name)


def make_fake_tensorrt(version="10.13.0.35", layer_names=("node_Conv_1", "node_conv2d_18"), parse_errors=(),
                       build_ok=True, gpu="H100", timing_cache_ok=True, io_dtypes=("FLOAT", "FLOAT"), out_channels=2,
                       context_ok=True, profile_ok=True):  # fmt: skip
    """``gpu``: the device timing caches are made on (a cache from another is a mismatch);
    ``profile_ok=False``: add_optimization_profile() returns -1, TensorRT's answer to an invalid profile;
    ``timing_cache_ok=False``: create_timing_cache() returns None even for b""; ``io_dtypes``: the engine's
    input and output DataType names; ``context_ok=False``: create_execution_context() returns None."""
    major = int(version.split(".")[0])
    log: set[tuple[str, str]] = set()
    classes: list[type] = []

    def fake(cls, name=None):
        type.__setattr__(cls, "_trt_name", name or cls.__name__)
        type.__setattr__(cls, "_log", log)
        classes.append(cls)
        return cls

    def enum_type(name, members):
        return fake(_IntEnum(name.split(".")[-1], members), name)

    # Real values (tests/data/tensorrt_api.json); 11.x dropped BuilderFlag.FP16/OBEY_PRECISION_CONSTRAINTS.
    flags = {"FP16": 0, "TF32": 6, "OBEY_PRECISION_CONSTRAINTS": 9} if major <= 10 else {"TF32": 6}
    builder_flag = enum_type("BuilderFlag", flags)
    memory_pool = enum_type("MemoryPoolType", {"WORKSPACE": 0})
    data_type = enum_type("DataType", {"FLOAT": 0, "HALF": 1, "BF16": 7})  # reached through trt.float32 & co only
    io_mode = enum_type("TensorIOMode", {"INPUT": 1, "OUTPUT": 2})
    severity = enum_type("ILogger.Severity", {"INTERNAL_ERROR": 0, "ERROR": 1})
    error, (input_mode, output_mode) = severity.ERROR, (io_mode.INPUT, io_mode.OUTPUT)
    engine_dtypes = tuple(data_type[d] for d in io_dtypes)

    @fake
    class ILogger(_Object):
        Severity = severity

        def __init__(self):
            pass

    @fake
    class ITensor(_Object):
        def __init__(self, name):
            self._name = name

        name = property(lambda self: self._name)

    if major <= 10:  # only the FP32 pinning reads layers, and 11.x has no per-layer precision to pin

        @fake
        class ILayer(_Object):
            def __init__(self, name):
                self._name, self._precision, self._output_types = name, None, {}

            name = property(lambda self: self._name)
            num_outputs = property(lambda self: 1)
            precision = property(lambda self: self._precision, lambda self, v: setattr(self, "_precision", v))

            def set_output_type(self, index, dtype):
                self._output_types[index] = dtype

    @fake
    class INetworkDefinition(_Object):
        def __init__(self, flags):
            self._flags, self._layers = flags, [ILayer(n) for n in layer_names] if major <= 10 else []

        num_layers = property(lambda self: len(layer_names))

        def get_input(self, index):
            return ITensor("input")

        if major <= 10:

            def get_layer(self, index):
                return self._layers[index]

    @fake
    class IHostMemory(_Object):
        def __init__(self, data):
            self._data = data

        def __bytes__(self):  # the real one is a buffer: bytes(memory) copies it
            return self._data

    @fake
    class ITimingCache(_Object):
        def __init__(self, device):
            self._device = device

        def serialize(self):
            return IHostMemory(b"cache:" + self._device.encode())

    @fake
    class IOptimizationProfile(_Object):
        def __init__(self):
            self._shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self._shapes[name] = (lo, opt, hi)

    @fake
    class IBuilderConfig(_Object):
        def __init__(self):
            self._flags, self._cleared, self._pool, self._profiles, self._cache = set(), set(), None, [], None
            self._cache_calls = []

        def set_memory_pool_limit(self, pool, size):
            self._pool = (pool, size)

        if major <= 10:  # FP16 and OBEY_PRECISION_CONSTRAINTS are the only flags the builder sets

            def set_flag(self, flag):
                self._flags.add(flag)

        def clear_flag(self, flag):
            self._cleared.add(flag)

        def add_optimization_profile(self, profile):
            if not profile_ok:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, blob):
            """A new cache for b"", the cache for a blob this fake serialised, else None (unreadable)."""
            blob = bytes(blob)
            self._cache_calls.append(("create", blob))
            if not timing_cache_ok:
                return None
            if not blob:
                return ITimingCache(gpu)
            return ITimingCache(blob[6:].decode()) if blob.startswith(b"cache:") else None

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, ITimingCache):  # pybind11 takes no None for the C++ reference
                raise TypeError("set_timing_cache(): incompatible function arguments")
            self._cache_calls.append(("set", cache._device))
            if cache._device != gpu and not ignore_mismatch:
                return False  # made on another device
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    @fake
    class ParserError(_Object):
        def __init__(self, node_name, operator, desc):
            self._error = (node_name, operator, desc)

        def node(self):
            return 3

        def node_name(self):
            return self._error[0]

        def node_operator(self):
            return self._error[1]

        def desc(self):
            return self._error[2]

    @fake
    class OnnxParser(_Object):
        def __init__(self, network, logger):
            pass

        num_errors = property(lambda self: len(parse_errors))

        def parse_from_file(self, path):
            return not parse_errors

        def get_error(self, index):
            return ParserError(*parse_errors[index])

    @fake
    class Builder(_Object):
        def __init__(self, logger):
            self._logger = logger

        def create_network(self, flags=0):
            trt._built["network"] = INetworkDefinition(flags)
            return trt._built["network"]

        def create_builder_config(self):
            trt._built["config"] = IBuilderConfig()
            return trt._built["config"]

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if not build_ok:
                self._logger.log(error, "out of workspace memory")
                return None
            return IHostMemory(b"PLAN")

    @fake
    class IExecutionContext(_Object):
        def __init__(self, names):
            self._names, self._shapes, self._addresses, self._streams = names, {}, {}, []
            self._switches = []  # (profile index, stream handle) per set_optimization_profile_async

        def set_optimization_profile_async(self, index, stream_handle):
            self._switches.append((index, stream_handle))
            return index >= 0

        def set_input_shape(self, name, shape):
            ok = name == self._names[0] and len(shape) == 4
            if ok:
                self._shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            shape = self._shapes[self._names[0]]
            return (shape[0], out_channels, *shape[2:]) if name == self._names[1] else shape

        def set_tensor_address(self, name, address):
            self._addresses[name] = address
            return name in self._names

        def execute_async_v3(self, stream_handle):
            self._streams.append(stream_handle)
            return set(self._addresses) == set(self._names)

    @fake
    class ICudaEngine(_Object):
        _names = ("input", "output")

        num_io_tensors = property(lambda self: 2)

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            return input_mode if name == self._names[0] else output_mode

        def get_tensor_dtype(self, name):
            return engine_dtypes[self._names.index(name)]

        def create_execution_context(self):
            trt._built["context"] = IExecutionContext(self._names) if context_ok else None
            return trt._built["context"]

    @fake
    class Runtime(_Object):
        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, blob):
            if not bytes(blob).startswith(b"PLAN"):  # another TensorRT version or GPU: None, and a logged error
                self._logger.log(error, "engine plan file is incompatible with this version of TensorRT")
                return None
            return ICudaEngine()

    trt = _Module(MODULE)
    trt.__version__ = version
    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, OnnxParser, Runtime
    trt.BuilderFlag, trt.MemoryPoolType, trt.TensorIOMode = builder_flag, memory_pool, io_mode
    trt.float32, trt.float16, trt.bfloat16 = data_type.FLOAT, data_type.HALF, data_type.BF16
    if major <= 10:  # 11.x is always strongly typed: the builder asks nothing there (the flag is 0 and ignored)
        trt.NetworkDefinitionCreationFlag = enum_type("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt._built, trt._classes, trt._used = {}, classes, log
    log.clear()  # the reads above were the fake's own
    return trt


class FakeStream:
    """What the runner uses of a torch.cuda.Stream: its handle and the waits that order it."""

    _handles = itertools.count(0x7F0000)

    def __init__(self, device=None, handle=None):
        self.cuda_stream = next(self._handles) if handle is None else handle
        self.waited_on: list[FakeStream] = []
        self.synchronized = 0

    def wait_stream(self, other):
        self.waited_on.append(other)

    def synchronize(self):
        self.synchronized += 1


def install_fake_cuda(monkeypatch, name="NVIDIA H100 80GB HBM3", capability=(9, 0)):
    """torch.cuda as the runner sees it on a GPU machine, with tensors left on the CPU (tests then drive the
    runner's _infer_impl directly). Returns the legacy default stream (handle 0) and the streams made."""
    cuda = types.SimpleNamespace(default=FakeStream(handle=0), created=[])

    def stream(device=None, **kwargs):
        cuda.created.append(FakeStream(device))
        return cuda.created[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cuda.default)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return cuda
