// Runs one emulated CUDA call (append_kv or decode, through the real host code of csrc/cuda:
// planning, workspace, launches) on buffers described by a case directory that
// tests/cuda_emu/runner.py writes:
//
//   case.txt   one directive per line
//     op decode | append
//     order forward | reverse | random      seed N      sms N      smem_optin BYTES
//     impl auto | tc | simple | sm90         (decode: the DecodeImpl requested from the planner)
//     buffer NAME BYTES FILE | -             a buffer of exactly BYTES (its own allocation, so ASan
//                                            sees its real bounds); "-": an output, filled with 0xff
//     output NAME                            written back as NAME.out after the call
//     writeonce NAME                         no two blocks of one launch may write the same byte
//     ptr FIELD BUFFER BYTE_OFFSET           a pointer field of the params struct
//     int FIELD VALUE / float FIELD VALUE    the other fields
//
// Prints one JSON line (the plan and the emulator's counters) and exits 0; emulator errors
// exit 86 (mla_emu::kErrorExitCode), sanitizer reports with the sanitizer's code.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_kernels.h"  // csrc/cuda (or a mutated copy of it) is on the include path
#include "sparse_kernels.h"
#include "emu_sm90.h"  // tma_boxes_issued
#include "emu_runtime.h"

namespace {

struct Buffer {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "harness: %s\n", msg.c_str());
  std::exit(2);
}

struct Case {
  std::string dir, op = "decode", impl = "auto";
  std::map<std::string, Buffer> buffers;
  std::vector<std::string> outputs, writeonce;
  std::map<std::string, std::pair<std::string, size_t>> ptrs;
  std::map<std::string, long long> ints;
  std::map<std::string, double> floats;

  void* ptr(const std::string& field, bool required = true) const {
    auto it = ptrs.find(field);
    if (it == ptrs.end()) {
      if (required) die("missing ptr " + field);
      return nullptr;
    }
    const Buffer& b = buffers.at(it->second.first);
    return b.data + it->second.second;
  }
  long long i(const std::string& field) const {
    auto it = ints.find(field);
    if (it == ints.end()) die("missing int " + field);
    return it->second;
  }
  double f(const std::string& field) const {
    auto it = floats.find(field);
    if (it == floats.end()) die("missing float " + field);
    return it->second;
  }
};

// Exactly `bytes` (aligned like a torch allocation); ASan reports a read one byte past it.
unsigned char* allocate(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) != 0) die("out of memory");
  return static_cast<unsigned char*>(p);
}

Case read_case(const std::string& dir) {
  Case c;
  c.dir = dir;
  std::ifstream in(dir + "/case.txt");
  if (!in) die("cannot read " + dir + "/case.txt");
  std::string line;
  mla_emu::Config& cfg = mla_emu::config();
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key;
    if (!(ls >> key) || key[0] == '#') continue;
    if (key == "op") ls >> c.op;
    else if (key == "impl") ls >> c.impl;
    else if (key == "order") {
      std::string o;
      ls >> o;
      cfg.order = o == "reverse" ? mla_emu::Order::kReverse
                  : o == "random" ? mla_emu::Order::kRandom
                                  : mla_emu::Order::kForward;
    } else if (key == "seed") ls >> cfg.seed;
    else if (key == "sms") ls >> cfg.sms;
    else if (key == "smem_optin") ls >> cfg.smem_optin;
    else if (key == "buffer") {
      std::string name, file;
      size_t bytes;
      ls >> name >> bytes >> file;
      Buffer b;
      b.bytes = bytes;
      b.data = allocate(bytes);
      if (file == "-") {
        std::memset(b.data, 0xff, bytes);
      } else {
        std::FILE* fp = std::fopen((dir + "/" + file).c_str(), "rb");
        if (fp == nullptr || std::fread(b.data, 1, bytes, fp) != bytes) die("cannot read " + file);
        std::fclose(fp);
      }
      c.buffers[name] = b;
    } else if (key == "output") {
      std::string n;
      ls >> n;
      c.outputs.push_back(n);
    } else if (key == "writeonce") {
      std::string n;
      ls >> n;
      c.writeonce.push_back(n);
    } else if (key == "ptr") {
      std::string field, buf;
      size_t off;
      ls >> field >> buf >> off;
      if (!c.buffers.count(buf)) die("ptr " + field + " names an unknown buffer " + buf);
      c.ptrs[field] = {buf, off};
    } else if (key == "int") {
      std::string field;
      long long v;
      ls >> field >> v;
      c.ints[field] = v;
    } else if (key == "float") {
      std::string field;
      double v;
      ls >> field >> v;
      c.floats[field] = v;
    } else {
      die("unknown directive " + key);
    }
  }
  return c;
}

mla::DType dtype(long long v) { return static_cast<mla::DType>(v); }

// p.FIELD = the case's "int FIELD", converted to the field's type.
#define INT_FIELD(field) p.field = static_cast<decltype(p.field)>(c.i(#field))

std::string run_append(const Case& c) {
  mla::AppendParams p{};
  p.kv_c = c.ptr("kv_c");
  p.k_pe = c.ptr("k_pe");
  p.cache = c.ptr("cache");
  p.slot_mapping = c.ptr("slot_mapping");
  p.scale = static_cast<const float*>(c.ptr("scale", false));
  INT_FIELD(kv_c_row_stride);
  INT_FIELD(k_pe_row_stride);
  INT_FIELD(cache_block_stride);
  INT_FIELD(cache_token_stride);
  INT_FIELD(num_tokens);
  INT_FIELD(num_blocks);
  INT_FIELD(block_size);
  p.slot_is_int64 = c.i("slot_is_int64") != 0;
  p.input_dtype = dtype(c.i("input_dtype"));
  p.cache_dtype = dtype(c.i("cache_dtype"));
  const cudaError_t err = mla::cuda::append_kv(p, nullptr);
  if (err != cudaSuccess) die(std::string("append_kv returned ") + cudaGetErrorString(err));
  return "{\"op\": \"append\"";
}

std::string run_decode(Case& c) {
  mla::DecodeParams p{};
  p.q_nope = c.ptr("q_nope");
  p.q_pe = c.ptr("q_pe");
  p.cache = c.ptr("cache");
  p.block_table = static_cast<const int32_t*>(c.ptr("block_table"));
  p.cache_seqlens = static_cast<const int32_t*>(c.ptr("cache_seqlens"));
  p.kv_scale = static_cast<const float*>(c.ptr("kv_scale", false));
  p.out = c.ptr("out");
  p.lse = static_cast<float*>(c.ptr("lse"));
  INT_FIELD(q_nope_batch_stride);
  INT_FIELD(q_nope_seq_stride);
  INT_FIELD(q_nope_head_stride);
  INT_FIELD(q_pe_batch_stride);
  INT_FIELD(q_pe_seq_stride);
  INT_FIELD(q_pe_head_stride);
  INT_FIELD(cache_block_stride);
  INT_FIELD(cache_token_stride);
  INT_FIELD(block_table_batch_stride);
  INT_FIELD(batch);
  INT_FIELD(seqlen_q);
  INT_FIELD(num_heads);
  INT_FIELD(num_blocks);
  INT_FIELD(block_size);
  INT_FIELD(max_blocks_per_seq);
  p.softmax_scale = static_cast<float>(c.f("softmax_scale"));
  p.causal = c.i("causal") != 0;
  p.q_dtype = dtype(c.i("q_dtype"));
  p.cache_dtype = dtype(c.i("cache_dtype"));

  using mla::cuda::DecodeImpl;
  const DecodeImpl requested = c.impl == "sm90" ? DecodeImpl::kSm90
                               : c.impl == "tc" ? DecodeImpl::kTensorCore
                               : c.impl == "simple" ? DecodeImpl::kSimple
                                                    : DecodeImpl::kAuto;
  const mla::cuda::DecodePlan plan = mla::cuda::plan_decode(p, 0, requested);
  p.num_splits = plan.num_splits;
  if (plan.num_splits > 1) {  // the split-KV workspace, as the torch glue allocates it (fp32)
    Buffer o{allocate(plan.workspace_o * sizeof(float)), static_cast<size_t>(plan.workspace_o) * sizeof(float)};
    Buffer l{allocate(plan.workspace_lse * sizeof(float)), static_cast<size_t>(plan.workspace_lse) * sizeof(float)};
    std::memset(o.data, 0xff, o.bytes);
    std::memset(l.data, 0xff, l.bytes);
    c.buffers["o_accum"] = o;
    c.buffers["lse_accum"] = l;
    p.o_accum = reinterpret_cast<float*>(o.data);
    p.lse_accum = reinterpret_cast<float*>(l.data);
    mla_emu::add_write_once_region(o.data, o.bytes, "o_accum");
    mla_emu::add_write_once_region(l.data, l.bytes, "lse_accum");
  }
  if (plan.workspace_sched > 0) {  // the device-side schedule's int32 workspace (sm90)
    const size_t bytes = static_cast<size_t>(plan.workspace_sched) * sizeof(int32_t);
    Buffer s{allocate(bytes), bytes};
    std::memset(s.data, 0xff, s.bytes);
    c.buffers["sched"] = s;
    p.sched = reinterpret_cast<int32_t*>(s.data);
  }
  const cudaError_t err = mla::cuda::decode(p, plan, nullptr);
  if (err != cudaSuccess) die(std::string("decode returned ") + cudaGetErrorString(err));
  const char* impl = plan.impl == DecodeImpl::kSm90 ? "sm90" : plan.impl == DecodeImpl::kTensorCore ? "tc" : "simple";
  return std::string("{\"op\": \"decode\", \"impl\": \"") + impl + "\", \"config\": " + std::to_string(plan.config) +
         ", \"num_splits\": " + std::to_string(plan.num_splits) +
         ", \"sched_ctas\": " + std::to_string(plan.sched_ctas);
}

#include "harness_sparse.h"  // op sparse: run_sparse

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: emu_harness CASE_DIR");
  Case c = read_case(argv[1]);
  for (const std::string& n : c.writeonce) {
    auto it = c.buffers.find(n);
    if (it == c.buffers.end()) die("writeonce names an unknown buffer " + n);
    mla_emu::add_write_once_region(it->second.data, it->second.bytes, n.c_str());
  }
  std::string json = c.op == "append"   ? run_append(c)
                     : c.op == "decode" ? run_decode(c)
                     : c.op == "sparse" ? run_sparse(c)
                                        : (die("bad op"), "");
  for (const std::string& n : c.outputs) {
    const Buffer& b = c.buffers.at(n);
    std::FILE* fp = std::fopen((c.dir + "/" + n + ".out").c_str(), "wb");
    if (fp == nullptr || std::fwrite(b.data, 1, b.bytes, fp) != b.bytes) die("cannot write " + n + ".out");
    std::fclose(fp);
  }
  const mla_emu::Stats& s = mla_emu::stats();
  std::printf("%s, \"launches\": %llu, \"blocks\": %llu, \"barriers\": %llu, \"shuffles\": %llu, \"ldmatrix\": %llu, "
              "\"mma\": %llu, \"cp_async\": %llu, \"switches\": %llu, \"tma_boxes\": %llu}\n",
              json.c_str(), (unsigned long long)s.launches, (unsigned long long)s.blocks,
              (unsigned long long)s.barriers, (unsigned long long)s.shuffles, (unsigned long long)s.ldmatrix,
              (unsigned long long)s.mma, (unsigned long long)s.cp_async, (unsigned long long)s.switches,
              (unsigned long long)mla_emu::sm90::tma_boxes_issued());
  return 0;
}
