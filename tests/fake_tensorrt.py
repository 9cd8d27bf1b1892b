"""A test double of the few TensorRT Python calls the builder makes, recording what it was asked.
It builds nothing: the tests that use it check the builder's decisions (flags, profile, layer
pinning, cache, errors), never an engine's output."""

import enum
import types


class FakeLayer:
    def __init__(self, name):
        self.name, self.precision, self.num_outputs, self.output_types = name, None, 1, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self, flags, layer_names):
        self.flags, self.layers = flags, [FakeLayer(n) for n in layer_names]
        self.num_layers = len(self.layers)

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return types.SimpleNamespace(name="input")


class FakeConfig:
    def __init__(self):
        self.flags, self.cleared, self.pool, self.profiles, self.cache = set(), set(), None, [], None

    def set_memory_pool_limit(self, pool, size):
        self.pool = (pool, size)

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.cleared.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, blob):
        return types.SimpleNamespace(blob=bytes(blob), serialize=lambda: b"cache:" + bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def make_fake_tensorrt(version="10.3.0", layer_names=("node_Conv_1", "node_conv2d_18"), parse_errors=(), build_ok=True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    builder_flags = ["TF32"] + (["FP16", "OBEY_PRECISION_CONSTRAINTS"] if int(version.split(".")[0]) <= 10 else [])
    trt.BuilderFlag = enum.Enum("BuilderFlag", builder_flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.float32 = "float32"
    trt.built = {}

    class ILogger:
        Severity = enum.Enum("Severity", ["ERROR", "INTERNAL_ERROR", "WARNING"])

        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.built["network"] = FakeNetwork(flags, layer_names)
            return trt.built["network"]

        def create_builder_config(self):
            trt.built["config"] = FakeConfig()
            return trt.built["config"]

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(shapes={})
            profile.set_shape = lambda name, lo, opt, hi: profile.shapes.update({name: (lo, opt, hi)})
            return profile

        def build_serialized_network(self, network, config):
            if not build_ok:
                self.logger.log(ILogger.Severity.ERROR, "out of workspace memory")
                return None
            return b"PLAN"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            return not parse_errors

        def get_error(self, i):
            e = parse_errors[i]
            return types.SimpleNamespace(node=lambda: 3, node_name=lambda: e[0], node_operator=lambda: e[1], desc=lambda: e[2])

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    return trt
