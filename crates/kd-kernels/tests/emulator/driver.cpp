// Runs one launch of one of kd's kernels (src/kernels/*.cu) in the CPU emulator.
//
// Request on stdin (little-endian): u32 name length, name, u32 blocks along x, y and z, u32
// threads a block, u32 argument
// count, then per argument a tag byte and its value: 'P' u64 byte length + bytes (a buffer the
// kernel gets a pointer to), 'i' i32, 'l' i64, 'f' f32. Each argument must have the type of the
// kernel's parameter at its position (a mismatch is an error, as are missing or extra ones); a
// struct parameter is given as its fields' arguments (`Take<SgdList>`).
// Reply on stdout: every buffer after the launch, in order, each as u64 byte length + bytes.
//
// `driver --list` prints the kernels it knows, one a line.
#include "cuda_emu.hpp"

#include "../../src/kernels/common.cuh"
#include "../../src/kernels/add_relu.cu"
#include "../../src/kernels/augment.cu"
#include "../../src/kernels/batch_norm.cu"
#include "../../src/kernels/max_pool.cu"
#include "../../src/kernels/sgd.cu"
#include "../../src/kernels/softmax_loss.cu"

#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>

namespace {

struct Arg {
    char tag;
    std::vector<unsigned char> bytes;  // 'P': the buffer; otherwise the scalar's bytes
};

struct Args {
    std::vector<Arg> list;
    size_t next = 0;

    Arg& take(char tag, const char* what) {
        if (next >= list.size()) kd_emu::fail("too few arguments for the kernel");
        Arg& a = list[next++];
        if (a.tag != tag) {
            char msg[96];
            std::snprintf(msg, sizeof msg, "argument %zu is '%c', the kernel wants %s", next - 1,
                          a.tag, what);
            kd_emu::fail(msg);
        }
        return a;
    }
};

template <class T>
struct Take;

template <class T>
struct Take<T*> {
    static T* from(Args& a) {
        Arg& arg = a.take('P', "a pointer");
        if (arg.bytes.size() % sizeof(T) != 0) kd_emu::fail("buffer size is not a whole number of elements");
        return reinterpret_cast<T*>(arg.bytes.data());
    }
};

template <class T>
T scalar(Args& a, char tag, const char* what) {
    Arg& arg = a.take(tag, what);
    T v;
    std::memcpy(&v, arg.bytes.data(), sizeof v);
    return v;
}

template <>
struct Take<int> {
    static int from(Args& a) { return scalar<int>(a, 'i', "an int"); }
};
template <>
struct Take<long long> {
    static long long from(Args& a) { return scalar<long long>(a, 'l', "a long long"); }
};
template <>
struct Take<float> {
    static float from(Args& a) { return scalar<float>(a, 'f', "a float"); }
};

// sgd_list_f32's parameter list, from the flat arguments: 'i' count, then per parameter 'P' p,
// 'P' g, 'P' buf, 'l' n, 'f' wd, 'i' first block, and last 'i' the blocks in all.
template <>
struct Take<SgdList> {
    static SgdList from(Args& a) {
        SgdList list{};
        list.count = Take<int>::from(a);
        if (list.count < 0 || list.count > KD_SGD_LIST) kd_emu::fail("SgdList count out of range");
        for (int t = 0; t < list.count; ++t) {
            list.p[t] = Take<float*>::from(a);
            list.g[t] = Take<float*>::from(a);
            list.buf[t] = Take<float*>::from(a);
            list.n[t] = Take<long long>::from(a);
            list.wd[t] = Take<float>::from(a);
            list.first_block[t] = Take<int>::from(a);
        }
        list.first_block[list.count] = Take<int>::from(a);
        return list;
    }
};

template <class... P>
void run(void (*kernel)(P...), dim3 grid, unsigned threads, Args& a) {
    // Braced initialisation evaluates left to right: arguments bind in order.
    std::tuple<P...> bound{Take<P>::from(a)...};
    if (a.next != a.list.size()) kd_emu::fail("too many arguments for the kernel");
    std::apply([&](P... p) { kd_emu::launch(grid, threads, kernel, p...); }, bound);
}

using Runner = std::function<void(dim3, unsigned, Args&)>;

#define KD_EMU_KERNEL(name) \
    { #name, [](dim3 g, unsigned t, Args& a) { run(name, g, t, a); } }

const std::map<std::string, Runner>& kernels() {
    static const std::map<std::string, Runner> all = {
        KD_EMU_KERNEL(add_relu_f32),
        KD_EMU_KERNEL(add_relu_bf16),
        KD_EMU_KERNEL(relu_backward_f32),
        KD_EMU_KERNEL(relu_backward_bf16),
        KD_EMU_KERNEL(augment_f32),
        KD_EMU_KERNEL(augment_bf16),
        KD_EMU_KERNEL(bn_stats_f32),
        KD_EMU_KERNEL(bn_stats_bf16),
        KD_EMU_KERNEL(bn_stats_finish),
        KD_EMU_KERNEL(bn_stats_finish_running),
        KD_EMU_KERNEL(bn_reduce_finish),
        KD_EMU_KERNEL(bn_apply_f32),
        KD_EMU_KERNEL(bn_apply_bf16),
        KD_EMU_KERNEL(bn_apply_add_relu_f32),
        KD_EMU_KERNEL(bn_apply_add_relu_bf16),
        KD_EMU_KERNEL(bn_eval_f32),
        KD_EMU_KERNEL(bn_eval_bf16),
        KD_EMU_KERNEL(bn_eval_add_relu_f32),
        KD_EMU_KERNEL(bn_eval_add_relu_bf16),
        KD_EMU_KERNEL(bn_backward_reduce_f32),
        KD_EMU_KERNEL(bn_backward_reduce_bf16),
        KD_EMU_KERNEL(bn_backward_data_f32),
        KD_EMU_KERNEL(bn_backward_data_bf16),
        KD_EMU_KERNEL(bn_update_running),
        KD_EMU_KERNEL(bn_stats_cl_f32),
        KD_EMU_KERNEL(bn_stats_cl_bf16),
        KD_EMU_KERNEL(bn_apply_cl_f32),
        KD_EMU_KERNEL(bn_apply_cl_bf16),
        KD_EMU_KERNEL(bn_apply_add_relu_cl_f32),
        KD_EMU_KERNEL(bn_apply_add_relu_cl_bf16),
        KD_EMU_KERNEL(bn_eval_cl_f32),
        KD_EMU_KERNEL(bn_eval_cl_bf16),
        KD_EMU_KERNEL(bn_eval_add_relu_cl_f32),
        KD_EMU_KERNEL(bn_eval_add_relu_cl_bf16),
        KD_EMU_KERNEL(bn_backward_reduce_cl_f32),
        KD_EMU_KERNEL(bn_backward_reduce_cl_bf16),
        KD_EMU_KERNEL(bn_backward_data_cl_f32),
        KD_EMU_KERNEL(bn_backward_data_cl_bf16),
        KD_EMU_KERNEL(max_pool_fwd_f32),
        KD_EMU_KERNEL(max_pool_fwd_bf16),
        KD_EMU_KERNEL(max_pool_bwd_f32),
        KD_EMU_KERNEL(max_pool_bwd_bf16),
        KD_EMU_KERNEL(max_pool_fwd_cl_f32),
        KD_EMU_KERNEL(max_pool_fwd_cl_bf16),
        KD_EMU_KERNEL(max_pool_bwd_cl_f32),
        KD_EMU_KERNEL(max_pool_bwd_cl_bf16),
        KD_EMU_KERNEL(sgd_momentum_f32),
        KD_EMU_KERNEL(sgd_param_f32),
        KD_EMU_KERNEL(sgd_list_f32),
        KD_EMU_KERNEL(xent_fwd),
        KD_EMU_KERNEL(xent_bwd),
        KD_EMU_KERNEL(kd_kl_fwd),
        KD_EMU_KERNEL(kd_kl_bwd),
    };
    return all;
}

void read_exact(void* p, size_t n) {
    if (n != 0 && std::fread(p, 1, n, stdin) != n) kd_emu::fail("truncated request");
}

template <class T>
T read_le() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--list") {
        for (auto& [name, _] : kernels()) std::printf("%s\n", name.c_str());
        return 0;
    }
    std::string name(read_le<uint32_t>(), '\0');
    read_exact(name.data(), name.size());
    dim3 grid;
    grid.x = read_le<uint32_t>();
    grid.y = read_le<uint32_t>();
    grid.z = read_le<uint32_t>();
    unsigned threads = read_le<uint32_t>();
    Args args;
    args.list.resize(read_le<uint32_t>());
    for (Arg& a : args.list) {
        a.tag = (char)read_le<uint8_t>();
        size_t n = a.tag == 'P' ? read_le<uint64_t>() : a.tag == 'l' ? 8 : 4;
        if (a.tag != 'P' && a.tag != 'i' && a.tag != 'l' && a.tag != 'f') kd_emu::fail("unknown argument tag");
        a.bytes.resize(n);
        read_exact(a.bytes.data(), n);
    }
    auto k = kernels().find(name);
    if (k == kernels().end()) kd_emu::fail(("no kernel named " + name).c_str());
    k->second(grid, threads, args);
    for (Arg& a : args.list) {
        if (a.tag != 'P') continue;
        uint64_t n = a.bytes.size();
        std::fwrite(&n, sizeof n, 1, stdout);
        if (n != 0) std::fwrite(a.bytes.data(), 1, n, stdout);  // an empty vector's data() may be null
    }
    return std::fflush(stdout) == 0 ? 0 : 4;
}
