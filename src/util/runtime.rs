//! Process-wide settings for CPU work, applied once at the start of the binary and the benches
//! ([`init`]), before any thread pool or large buffer exists.

/// Applies the settings below; later calls do nothing.
///
/// - **Thread count.** candle asks for its thread count on every matmul and every elementwise op,
///   and unless `RAYON_NUM_THREADS` is set it counts the physical cores by reading
///   `/proc/cpuinfo` each time: about 3 % of a U-Net training step on 2 cores went to that. When
///   the variable is unset it is set to the available parallelism (what rayon's own pool uses),
///   so candle, rayon and our kernels agree and the count is read once. A value the user set is
///   left as it is.
/// - **candle's elementwise pool.** candle runs elementwise ops on its own pool, whose workers
///   spin for a while after each op. Our kernels and the GEMMs run on rayon's pool, so on a small
///   machine the spinning worker takes a core from them: on 2 cores, 12 % of a U-Net training
///   step's samples were that spin, and one elementwise thread made the step 10 % faster
///   (these ops are bound by memory bandwidth, which one core nearly fills). With at most 4
///   threads and `CANDLE_NUM_THREADS` unset, it is set to 1; larger machines keep candle's pool.
/// - **Allocator (glibc).** A training step allocates and frees the same activation buffers
///   every step. glibc maps buffers above a moving threshold with `mmap` and returns them on
///   free, so every step paid page faults and zeroing for fresh pages again. The threshold is
///   fixed at glibc's maximum (32 MiB) and freed memory is kept up to 512 MiB, so buffers are
///   reused from the heap. Peak memory is unchanged (the same buffers are live at the peak).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1);
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() && threads <= 4 {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallopt only changes allocator parameters; it is called before other
            // threads exist (first thing in main / the bench) and takes plain integers.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            }
        }
    });
}

/// Runs `f` on a worker of a rayon pool with one thread per core (`RAYON_NUM_THREADS`), which our
/// kernels and candle's GEMMs then use: the thread that drives the model takes part in every
/// parallel section instead of waiting beside the pool's threads, so a 2-core machine runs 2 busy
/// threads, not 3 (the driving thread's idle spins took CPU from the workers). The workers get
/// the main thread's stack size of 8 MiB or more (64 MiB), since candle's backward walks the graph
/// recursively. Falls back to running `f` here if the pool cannot be built.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(64 << 20)
        .thread_name(|i| format!("postforge-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
