"""Unit tests of benchmarks/cuda_sass_check.py on small synthetic SASS text: the cuobjdump
parsers, the kernel classification, every rule (each must fail when its instruction is taken
away) and the mutation table against the current csrc/cuda sources. No nvcc, no cuobjdump."""
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_sass_check", os.path.join(ROOT, "benchmarks", "cuda_sass_check.py"))
sc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cuda_sass_check", sc)  # dataclasses look the module up by name
_spec.loader.exec_module(sc)

BF16_CFG = "mla::cuda::TcConfig<64, 32, 3, false>"
FP8_CFG = "mla::cuda::TcConfig<64, 32, 4, true>"


def _line(addr, text, enc=True):
    """One cuobjdump instruction line (encoding on the same line, as cuobjdump prints it)."""
    s = f"        /*{addr:04x}*/                   {text} ;"
    return s + ("                    /* 0x000fe200078e00ff */" if enc else "")


def sass_text(funcs):
    """cuobjdump -sass style text for [(arch, name, [instruction text])]."""
    out = ["", "Fatbin elf code:", "================", ""]
    arch = None
    for a, name, instrs in funcs:
        if a != arch:
            out += [f"\tcode for {a}", f"\t.target\t{a}", ""]
            arch = a
        out += [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"']
        for i, t in enumerate(instrs):
            out.append(_line(16 * i, t))
            out.append("                                                                                               /* 0x000e620000002600 */")
        out.append("\t\t..........\n")
    return "\n".join(out)


def good_instrs(dtype="bf16", fp8=False):
    hmma = "HMMA.16816.F32.BF16" if dtype == "bf16" else "HMMA.16816.F32"
    ins = [
        "IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28]",
        "@!P0 LDGSTS.E.BYPASS.128 [R9], [R10.64], !P0",
        "LDGSTS.E.BYPASS.LTC128B.128.ZFILL [R11+0x12400], [R8.64], P0",
        "LDGDEPBAR",
        "DEPBAR.LE SB0, 0x1",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "LDSM.16.M88.4 R152, [R186+0xa0]",
        f"{hmma} R156, R176.reuse, R172, R156",
        "SHFL.BFLY PT, R9, R2, 0x2, 0x1f",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "LDSM.16.MT88.4 R8, [R212]",
        f"{hmma} R164, R152, R42, R164",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "EXIT",
    ]
    if fp8:
        ins += ["PRMT R3, R2, 0x4140, RZ", "BAR.SYNC.DEFER_BLOCKING 0x0"]
    return ins


def tc_name(dtype="bf16", cfg=BF16_CFG):
    t = "__nv_bfloat16" if dtype == "bf16" else "__half"
    return f"void mla::cuda::decode_tc_kernel<{t}, {cfg} >(mla::DecodeParams)"


def kernel(instrs, dtype="bf16", cfg=BF16_CFG, stack=0, local=0, obj="decode_tc_bf16.sm_80.o"):
    f = sc.parse_sass(sass_text([("sm_80", "_Z3foo", instrs)]))[0]
    f.demangled, f.stack, f.local, f.regs = tc_name(dtype, cfg), stack, local, 200
    k = sc.tc_kernel(f, obj)
    assert k is not None
    return k


def failed(k):
    return sorted(rule for rule, _ in sc.check_kernel(k))


# ---- parsers


def test_parse_sass_functions_archs_predicates():
    text = sass_text([
        ("sm_80", "_ZN3mla4cuda1aEv", ["@!P0 LDG.E R5, [R2.64]", "HMMA.16816.F32.BF16 R1, R2, R3, R1", "EXIT"]),
        ("sm_80", "_ZN3mla4cuda1bEv", ["@P1 BRA 0x120", "NOP"]),
        ("sm_90a", "_ZN3mla4cuda1aEv", ["@!UPT UIADD3 UR4, UR4, 0x1, URZ", "BAR.SYNC.DEFER_BLOCKING 0x0"]),
    ])
    funcs = sc.parse_sass(text)
    assert [(f.arch, f.name, len(f.instrs)) for f in funcs] == [
        ("sm_80", "_ZN3mla4cuda1aEv", 3), ("sm_80", "_ZN3mla4cuda1bEv", 2), ("sm_90a", "_ZN3mla4cuda1aEv", 2)]
    a = funcs[0].instrs
    assert (a[0].pred, a[0].opcode, a[0].operands) == ("@!P0", "LDG.E", "R5, [R2.64]")
    assert (a[1].pred, a[1].opcode) == ("", "HMMA.16816.F32.BF16")
    assert funcs[1].instrs[0].pred == "@P1"
    assert (funcs[2].instrs[0].pred, funcs[2].instrs[0].opcode) == ("@!UPT", "UIADD3")
    # The encoding-only continuation lines and header lines are not instructions.
    assert sum(len(f.instrs) for f in funcs) == 7


def test_count_opcode_and_operands():
    f = sc.parse_sass(sass_text([("sm_80", "f", ["DEPBAR.LE SB0, 0x1", "DEPBAR.LE SB1, 0x0", "DEPBAR"])]))[0]
    assert f.count(r"^DEPBAR") == 3
    assert f.count(r"^DEPBAR\.LE$") == 2
    assert f.count(r"^DEPBAR\.LE$", r"\bSB0\b") == 1


def test_parse_res_usage():
    text = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN3mla4cuda1aEv:
  REG:234 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN3mla4cuda1bEv:
  REG:128 STACK:96 SHARED:0 LOCAL:8 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
Resource usage:
 Function _ZN3mla4cuda1aEv:
  REG:239 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552
"""
    u = sc.parse_res_usage(text)
    assert u[("sm_80", "_ZN3mla4cuda1aEv")]["REG"] == 234
    assert u[("sm_80", "_ZN3mla4cuda1bEv")] == {"REG": 128, "STACK": 96, "SHARED": 0, "LOCAL": 8}
    assert u[("sm_90a", "_ZN3mla4cuda1aEv")]["REG"] == 239
    assert len(u) == 3


# ---- classification


@pytest.mark.parametrize("dtype,cfg,obj,fp8", [
    ("bf16", BF16_CFG, "decode_tc_bf16.sm_80.o", False),
    ("fp16", FP8_CFG, "decode_tc_fp8_fp16.sm_90a.o", True),
    # no bool in the config name: the object's file name decides
    ("bf16", "mla::cuda::TcFp8ConfigL", "decode_tc_fp8_bf16.sm_80.o", True),
    ("fp16", "mla::cuda::TcConfigL", "decode_tc_fp16.sm_80.o", False),
])
def test_tc_kernel_classification(dtype, cfg, obj, fp8):
    f = sc.Function("x", "sm_80", demangled=tc_name(dtype, cfg))
    k = sc.tc_kernel(f, obj)
    assert (k.dtype, k.fp8) == (dtype, fp8)


def test_other_kernels_are_not_tc():
    for d in ("void mla::cuda::combine_kernel<__half, mla::cuda::DenseSplitLayout>(mla::cuda::CombineArgs, mla::cuda::DenseSplitLayout)",
              "void mla::cuda::(anonymous namespace)::decode_simple_kernel<float, float>(mla::DecodeParams)"):
        assert sc.tc_kernel(sc.Function("x", "sm_80", demangled=d), "decode.sm_80.o") is None


# ---- rules


@pytest.mark.parametrize("dtype,fp8", [("bf16", False), ("fp16", False), ("bf16", True), ("fp16", True)])
def test_good_kernel_passes(dtype, fp8):
    assert failed(kernel(good_instrs(dtype, fp8), dtype, FP8_CFG if fp8 else BF16_CFG)) == []


# (instruction regex removed from the good kernel, rule that must fire)
REMOVALS = [
    (r"^HMMA", "hmma_bf16"),
    (r"^LDSM\.16\.MT88", "ldsm_x4_trans"),
    (r"^LDSM\.16\.M88", "ldsm_x4"),
    (r"^LDGSTS", "ldgsts"),
    (r"^LDGDEPBAR", "cp_async_commit"),
    (r"^DEPBAR", "cp_async_wait"),
    (r"^SHFL", "shfl_bfly"),
]


@pytest.mark.parametrize("pattern,rule", REMOVALS)
def test_each_rule_fires_when_its_instruction_is_gone(pattern, rule):
    ins = [i for i in good_instrs() if not re.search(pattern, re.sub(r"^@\S+\s+", "", i))]
    assert failed(kernel(ins)) == [rule]


def test_one_barrier_fewer_fails():
    ins = good_instrs()
    ins.remove("BAR.SYNC.DEFER_BLOCKING 0x0")
    assert failed(kernel(ins)) == ["bar_sync_16bit"]
    ins8 = good_instrs("bf16", fp8=True)
    ins8.remove("BAR.SYNC.DEFER_BLOCKING 0x0")
    assert failed(kernel(ins8, cfg=FP8_CFG)) == ["bar_sync_fp8"]
    # an fp8 kernel needs PRMT
    no_prmt = [i for i in good_instrs("bf16", fp8=True) if not i.startswith("PRMT")]
    assert failed(kernel(no_prmt, cfg=FP8_CFG)) == ["prmt_fp8"]


def test_wrong_mma_type_or_shape_fails():
    to_fp16 = [i.replace("HMMA.16816.F32.BF16", "HMMA.16816.F32") for i in good_instrs("bf16")]
    assert failed(kernel(to_fp16, "bf16")) == ["hmma_bf16", "hmma_only_bf16"]
    to_bf16 = [i.replace("HMMA.16816.F32", "HMMA.16816.F32.BF16") for i in good_instrs("fp16")]
    assert failed(kernel(to_bf16, "fp16")) == ["hmma_fp16", "hmma_only_fp16"]
    # one m16n8k8 among the m16n8k16: still a different instruction
    mixed = good_instrs("bf16") + ["HMMA.1688.F32.BF16 R1, R2, R3, R1"]
    assert failed(kernel(mixed, "bf16")) == ["hmma_only_bf16"]
    # x2 ldmatrix instead of x4 does not count as x4
    x2 = [i.replace("LDSM.16.M88.4", "LDSM.16.M88.2") for i in good_instrs()]
    assert failed(kernel(x2)) == ["ldsm_x4"]


def test_local_memory_and_stack_fail():
    assert failed(kernel(good_instrs() + ["STL [R1+0x10], R4", "LDL R4, [R1+0x10]"])) == ["no_local_memory"]
    assert failed(kernel(good_instrs(), stack=16)) == ["stack_frame"]
    assert failed(kernel(good_instrs(), local=8)) == ["local_memory"]


# ---- mutations: every pattern still matches the current sources (no nvcc needed)


@pytest.mark.parametrize("m", sc.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_to_current_sources(m):
    with open(os.path.join(ROOT, "csrc", "cuda", m.file)) as fh:
        src = fh.read()
    out = sc.apply_mutation(src, m)
    assert out != src
    assert m.expect in {r.name for r in sc.RULES}
    for cu in m.compile:
        assert os.path.exists(os.path.join(ROOT, "csrc", "cuda", cu))


def test_mutation_table_size_and_stale_pattern():
    assert len(sc.MUTATIONS) >= 5
    assert len({m.name for m in sc.MUTATIONS}) == len(sc.MUTATIONS)
    stale = sc.Mutation("x", "common.cuh", r"no such text", "", ("decode_tc_bf16.cu",), "ldgsts")
    with pytest.raises(ValueError, match="not found"):
        sc.apply_mutation("int x;", stale)


def test_mutation_occurrence_and_count():
    src = "a; __syncthreads(); b; __syncthreads(); c; __syncthreads();"
    first = sc.Mutation("x", "f", r"__syncthreads\(\);", ";", (), "bar_sync_16bit", occurrence=0)
    last = sc.Mutation("x", "f", r"__syncthreads\(\);", ";", (), "bar_sync_16bit", occurrence=-1)
    every = sc.Mutation("x", "f", r"__syncthreads\(\);", ";", (), "bar_sync_16bit", count=0)
    assert sc.apply_mutation(src, first) == "a; ; b; __syncthreads(); c; __syncthreads();"
    assert sc.apply_mutation(src, last) == "a; __syncthreads(); b; __syncthreads(); c; ;"
    assert sc.apply_mutation(src, every).count("__syncthreads") == 0


def test_barrier_rule_counts_match_the_source():
    """The BAR.SYNC minimum must equal the kernel's __syncthreads count, or deleting one barrier
    would go unseen: a barrier added to decode_tc.cuh must raise BARRIERS_FP8 (and BARRIERS_16BIT
    unless it is fp8-only)."""
    with open(os.path.join(ROOT, "csrc", "cuda", "decode_tc.cuh")) as fh:
        src = fh.read()
    assert src.count("__syncthreads();") == sc.BARRIERS_FP8
    assert len(sc.barrier_mutations()) == sc.BARRIERS_FP8
    assert sc.BARRIERS_16BIT == sc.BARRIERS_FP8 - 1


# ---- the Hopper decode kernel (SM90_RULES)


def sm90_good_instrs():
    return [
        "USETMAXREG.DEALLOC.CTAPOOL 0x28",
        "USETMAXREG.TRY_ALLOC.CTAPOOL P0, 0xe8",
        "LDGSTS.E.BYPASS.128.ZFILL [R9], [R10.64], P0",
        "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ, [UR4+0x36000], RZ",
        "UTMALDG.2D.128 [UR8], [UR10]",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x36000], R3",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT",
        "HGMMA.64x256x16.F32.BF16 R88, R20, gdesc[UR12], R88",
        "EXIT",
    ]


def sm90(instrs, name="void mla::cuda::sm90::decode_sm90_kernel<false>(mla::DecodeParams, CUtensorMap_st, bool)"):
    f = sc.parse_sass(sass_text([("sm_90a", "_Z3bar", instrs)]))[0]
    f.demangled = name
    k = sc.sm90_kernel(f)
    assert k is not None and sc.tc_kernel(f, "decode_sm90.sm_90a.o") is None
    return k


@pytest.mark.parametrize("name,dtype,fp8", [
    ("void mla::cuda::sm90::decode_sm90_kernel<false>(mla::DecodeParams, CUtensorMap_st, bool)", "bf16", False),
    ("void mla::cuda::sm90::decode_sm90_kernel<__half, true>(mla::DecodeParams, CUtensorMap_st, bool)", "fp16", True),
    ("void mla::cuda::sm90::decode_sm90_kernel<__nv_bfloat16, false>(mla::DecodeParams, CUtensorMap_st, bool)", "bf16",
     False),
])
def test_sm90_kernel_classification(name, dtype, fp8):
    k = sm90(sm90_good_instrs(), name)
    assert (k.dtype, k.fp8) == (dtype, fp8)


@pytest.mark.parametrize("pattern,rule", [
    (r"^UTMALDG", "sm90_utmaldg"), (r"^LDGSTS", "sm90_ldgsts"), (r"^HGMMA\.64x64", "sm90_hgmma_ss"),
    (r"^HGMMA\.64x256", "sm90_hgmma_rs"), (r"^SYNCS\.PHASECHK", "sm90_mbarrier_wait"),
    (r"^SYNCS\.ARRIVE", "sm90_mbarrier_arrive"), (r"^USETMAXREG\.DEALLOC", "sm90_setmaxnreg"),
])
def test_sm90_rule_fires_when_its_instruction_is_gone(pattern, rule):
    assert sorted(r for r, _ in sc.check_kernel(sm90(sm90_good_instrs()), sc.SM90_RULES)) == []
    ins = [i for i in sm90_good_instrs() if not re.search(pattern, i)]
    assert sorted(r for r, _ in sc.check_kernel(sm90(ins), sc.SM90_RULES)) == [rule]


def test_sm90_fp8_kernel_needs_no_tma_and_rs_needs_register_a():
    fp8 = "void mla::cuda::sm90::decode_sm90_kernel<true>(mla::DecodeParams, CUtensorMap_st, bool)"
    no_tma = [i for i in sm90_good_instrs() if not i.startswith("UTMALDG")]
    assert sc.check_kernel(sm90(no_tma, fp8), sc.SM90_RULES) == []  # the fp8 cache stays on cp.async
    ss_pv = [i.replace("R88, R20, gdesc", "R88, gdesc") for i in sm90_good_instrs()]
    assert [r for r, _ in sc.check_kernel(sm90(ss_pv), sc.SM90_RULES)] == ["sm90_hgmma_rs"]
