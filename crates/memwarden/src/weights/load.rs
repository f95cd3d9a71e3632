//! The loader: several threads read a model file's data section in chunks and put each chunk
//! into the model's block (for a GPU, through each thread's pinned staging ring, so the copies
//! overlap the reads), hashing every chunk as it passes.

use super::file::{combine_hashes, ModelFile, HASH_CHUNK_BYTES};
use super::WeightsError;
use memwarden_backends::{DedicatedBlock, DedicatedError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::operations::Progress;
use crate::sync::lock;
use memwarden_core::units::KIB;

/// Bytes read (and hashed) at a time within a chunk.
const PIECE_BYTES: usize = (512 * KIB) as usize;

/// What a load measured.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub hash: String,
    pub elapsed: Duration,
}

/// Threads to use: `configured`, or one per CPU up to 16 when 0; never more than chunks.
pub fn thread_count(configured: usize, data_bytes: u64) -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
    let want = if configured == 0 { cpus.min(16) } else { configured };
    want.clamp(1, data_bytes.div_ceil(HASH_CHUNK_BYTES).max(1) as usize)
}

/// Fills `block` with the file's data section. The first error stops every thread; the block
/// is then the caller's to drop.
pub fn fill(block: &dyn DedicatedBlock, file: &ModelFile, threads: usize, hash: bool) -> Result<Loaded, WeightsError> {
    fill_counting(block, file, threads, hash, None)
}

/// [`fill`], adding the bytes read from the file to `progress` as they come (a piece at a time).
pub fn fill_counting(
    block: &dyn DedicatedBlock,
    file: &ModelFile,
    threads: usize,
    hash: bool,
    progress: Option<&Progress>,
) -> Result<Loaded, WeightsError> {
    let started = Instant::now();
    let chunks = file.data_bytes.div_ceil(HASH_CHUNK_BYTES);
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let hashes = Mutex::new(vec![[0u8; 32]; chunks as usize]);
    let first_error: Mutex<Option<WeightsError>> = Mutex::new(None);
    let path = &file.identity.path;
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let result = (|| -> Result<(), WeightsError> {
                    let f = std::fs::File::open(path).map_err(|e| WeightsError::file(path, e))?;
                    let mut writer = block.writer(HASH_CHUNK_BYTES)?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks || failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let offset = i * HASH_CHUNK_BYTES;
                        let len = HASH_CHUNK_BYTES.min(file.data_bytes - offset) as usize;
                        // The filler's own error (a read that failed) stands over the writer's.
                        let mut failure: Option<WeightsError> = None;
                        let put = writer.put(offset, &mut |buf: &mut [u8]| {
                            let read = read_chunk(&f, file, &mut buf[..len], offset, hash, progress);
                            let read = read.map(|digest| {
                                if let Some(d) = digest {
                                    lock(&hashes)[i as usize] = d;
                                }
                                len
                            });
                            read.map_err(|e| {
                                failure = Some(e);
                                DedicatedError::Stopped
                            })
                        });
                        if let Err(e) = put {
                            return Err(failure.take().unwrap_or_else(|| e.into()));
                        }
                    }
                    Ok(writer.finish()?)
                })();
                if let Err(e) = result {
                    failed.store(true, Ordering::Relaxed);
                    lock(&first_error).get_or_insert(e);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let hashes = hashes.into_inner().unwrap_or_else(|p| p.into_inner());
    let hash = if hash { combine_hashes(&hashes, file.data_bytes) } else { String::new() };
    Ok(Loaded { hash, elapsed: started.elapsed() })
}

/// Reads the file's data section at `offset` into `buf`, in pieces small enough to stay in the
/// core's L2 cache, hashing each one while it is there (`hash`): the hash then costs no second
/// pass over memory (the same hash as of the whole chunk at once). Returns the chunk's hash.
fn read_chunk(
    f: &std::fs::File,
    file: &ModelFile,
    buf: &mut [u8],
    offset: u64,
    hash: bool,
    progress: Option<&Progress>,
) -> Result<Option<[u8; 32]>, WeightsError> {
    let path = &file.identity.path;
    let mut hasher = hash.then(blake3::Hasher::new);
    for (k, piece) in buf.chunks_mut(PIECE_BYTES).enumerate() {
        let at = file.data_start + offset + (k * PIECE_BYTES) as u64;
        memwarden_sys::fs::read_exact_at(f, piece, at)
            .map_err(|e| WeightsError::LoadFailed(format!("reading {} at {at}: {e}", path.display())))?;
        if let Some(h) = hasher.as_mut() {
            h.update(piece);
        }
        if let Some(p) = progress {
            p.add(piece.len() as u64);
        }
    }
    Ok(hasher.map(|h| *h.finalize().as_bytes()))
}
