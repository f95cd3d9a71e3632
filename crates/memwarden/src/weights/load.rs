//! The loader: several threads read a model's files' data sections in chunks (a chunk lies in
//! one file; the threads take chunks of every file at once) and put each chunk into the
//! model's block (for a GPU, through each thread's pinned staging ring, so the copies
//! overlap the reads), hashing every chunk as it passes.

use super::file::{combine_hashes, ModelFile, Piece, Shard, HASH_CHUNK_BYTES};
use super::WeightsError;
use memwarden_backends::{DedicatedBlock, DedicatedError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::operations::Progress;
use crate::sync::lock;
use memwarden_core::units::KIB;

/// Bytes read (and hashed) at a time within a chunk.
const PIECE_BYTES: usize = (512 * KIB) as usize;

/// A writer's buffer: a chunk of a file (a staging slot of this size is made once and kept).
const PUT_BYTES: u64 = HASH_CHUNK_BYTES;

/// Consecutive pieces (end to end in the block) grouped into puts of at most [`PUT_BYTES`]: a
/// chunk's pieces and the padding between them may span a little more than a chunk, so a piece
/// that does not fit is split between two puts (padding never is: it is at most 255 bytes).
fn puts(pieces: &[Piece]) -> Vec<Vec<Piece>> {
    let (mut out, mut put): (Vec<Vec<Piece>>, Vec<Piece>) = (Vec::new(), Vec::new());
    for &p in pieces {
        let mut p = p;
        loop {
            let used = put.first().map_or(0, |first| p.at - first.at);
            let room = PUT_BYTES - used;
            if p.pad + p.bytes <= room {
                put.push(p);
                break;
            }
            if p.pad < room {
                let k = room - p.pad;
                put.push(Piece { bytes: k, ..p });
                p = Piece { file_offset: p.file_offset + k, at: p.at + p.pad + k, pad: 0, bytes: p.bytes - k };
            }
            out.push(std::mem::take(&mut put));
        }
    }
    if !put.is_empty() {
        out.push(put);
    }
    out
}

/// What a load measured.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The model's hash ([`ModelFile::model_hash`]); empty when not hashed.
    pub hash: String,
    /// Each file's hash, in the model's shard order (empty when not hashed).
    pub file_hashes: Vec<String>,
    pub elapsed: Duration,
}

/// Threads to use: `configured`, or one per CPU up to 16 when 0; never more than chunks.
pub fn thread_count(configured: usize, data_bytes: u64) -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
    let want = if configured == 0 { cpus.min(16) } else { configured };
    want.clamp(1, data_bytes.div_ceil(HASH_CHUNK_BYTES).max(1) as usize)
}

/// One chunk of the model: `len` bytes of shard `shard`'s data at `offset`. Every file is
/// chunked from its own start, so each file's hash is the same as when loaded alone.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    shard: usize,
    offset: u64,
    len: u64,
    /// Its index among its shard's chunks.
    nth: usize,
}

fn chunks_of(file: &ModelFile) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (shard, s) in file.shards.iter().enumerate() {
        for nth in 0..s.data_bytes.div_ceil(HASH_CHUNK_BYTES) {
            let offset = nth * HASH_CHUNK_BYTES;
            out.push(Chunk { shard, offset, len: HASH_CHUNK_BYTES.min(s.data_bytes - offset), nth: nth as usize });
        }
    }
    out
}

/// Fills `block` with the model's data: every shard's data section at its base. The first
/// error stops every thread; the block is then the caller's to drop.
pub fn fill(block: &dyn DedicatedBlock, file: &ModelFile, threads: usize, hash: bool) -> Result<Loaded, WeightsError> {
    fill_counting(block, file, threads, hash, None)
}

/// [`fill`], adding the bytes read from the files to `progress` as they come (a piece at a
/// time). The threads take chunks in order, whichever shard they belong to: the files are read
/// at once.
pub fn fill_counting(
    block: &dyn DedicatedBlock,
    file: &ModelFile,
    threads: usize,
    hash: bool,
    progress: Option<&Progress>,
) -> Result<Loaded, WeightsError> {
    let started = Instant::now();
    let chunks = chunks_of(file);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let hashes: Vec<Mutex<Vec<[u8; 32]>>> = file
        .shards
        .iter()
        .map(|s| Mutex::new(vec![[0u8; 32]; s.data_bytes.div_ceil(HASH_CHUNK_BYTES) as usize]))
        .collect();
    let first_error: Mutex<Option<WeightsError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let work =
                    Work { file, chunks: &chunks, next: &next, failed: &failed, hashes: &hashes, hash, progress };
                if let Err(e) = work.run(block) {
                    failed.store(true, Ordering::Relaxed);
                    lock(&first_error).get_or_insert(e);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let file_hashes: Vec<String> = if hash {
        hashes
            .into_iter()
            .zip(&file.shards)
            .map(|(h, s)| combine_hashes(&h.into_inner().unwrap_or_else(|p| p.into_inner()), s.data_bytes))
            .collect()
    } else {
        Vec::new()
    };
    let hash = if hash { ModelFile::model_hash(&file_hashes) } else { String::new() };
    Ok(Loaded { hash, file_hashes, elapsed: started.elapsed() })
}

/// What every loader thread shares.
struct Work<'a> {
    file: &'a ModelFile,
    chunks: &'a [Chunk],
    next: &'a AtomicUsize,
    failed: &'a AtomicBool,
    hashes: &'a [Mutex<Vec<[u8; 32]>>],
    hash: bool,
    progress: Option<&'a Progress>,
}

impl Work<'_> {
    /// One thread: takes the next chunk until none is left or another thread failed.
    fn run(&self, block: &dyn DedicatedBlock) -> Result<(), WeightsError> {
        let mut open: Vec<Option<std::fs::File>> = self.file.shards.iter().map(|_| None).collect();
        let mut writer = block.writer(PUT_BYTES)?;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&c) = self.chunks.get(i) else { break };
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            let shard = &self.file.shards[c.shard];
            let f = match &mut open[c.shard] {
                Some(f) => f,
                slot => slot.insert(
                    std::fs::File::open(&shard.identity.path)
                        .map_err(|e| WeightsError::file(&shard.identity.path, e))?,
                ),
            };
            // The chunk goes to the block with the padding between its tensors there (see
            // `TENSOR_ALIGN_BYTES`), in puts of at most a writer's buffer; it is hashed as the
            // file has it.
            let mut hasher = self.hash.then(blake3::Hasher::new);
            for put in &puts(&shard.pieces(c.offset, c.len)) {
                let (start, len) = (put[0].at, (put[put.len() - 1].end() - put[0].at) as usize);
                // The filler's own error (a read that failed) stands over the writer's.
                let mut failure: Option<WeightsError> = None;
                let filled = writer.put(shard.base + start, &mut |buf: &mut [u8]| {
                    for p in put {
                        let (zeros, data) = ((p.at - start) as usize, (p.at + p.pad - start) as usize);
                        buf[zeros..data].fill(0);
                        let dest = &mut buf[data..data + p.bytes as usize];
                        if let Err(e) = read_range(f, shard, dest, p.file_offset, hasher.as_mut(), self.progress) {
                            failure = Some(e);
                            return Err(DedicatedError::Stopped);
                        }
                    }
                    Ok(len)
                });
                if let Err(e) = filled {
                    return Err(failure.take().unwrap_or_else(|| e.into()));
                }
            }
            if let Some(h) = hasher {
                lock(&self.hashes[c.shard])[c.nth] = *h.finalize().as_bytes();
            }
        }
        Ok(writer.finish()?)
    }
}

/// Reads a shard's data section at `offset` into `buf`, in pieces small enough to stay in the
/// core's L2 cache, feeding each one to `hasher` while it is there: the hash then costs no
/// second pass over memory (the same hash as of the whole range at once).
fn read_range(
    f: &std::fs::File,
    shard: &Shard,
    buf: &mut [u8],
    offset: u64,
    mut hasher: Option<&mut blake3::Hasher>,
    progress: Option<&Progress>,
) -> Result<(), WeightsError> {
    let path = &shard.identity.path;
    for (k, piece) in buf.chunks_mut(PIECE_BYTES).enumerate() {
        let at = shard.data_start + offset + (k * PIECE_BYTES) as u64;
        memwarden_sys::fs::read_exact_at(f, piece, at)
            .map_err(|e| WeightsError::LoadFailed(format!("reading {} at {at}: {e}", path.display())))?;
        if let Some(h) = hasher.as_mut() {
            h.update(piece);
        }
        if let Some(p) = progress {
            p.add(piece.len() as u64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(file_offset: u64, at: u64, pad: u64, bytes: u64) -> Piece {
        Piece { file_offset, at, pad, bytes }
    }

    /// Puts stay within a writer's buffer, lie end to end, and carry every byte and every zero
    /// of the pieces, in order: a piece that does not fit is split, never its padding.
    #[test]
    fn puts_fill_each_buffer_and_split_only_data() {
        let c = PUT_BYTES;
        let pieces = vec![piece(0, 0, 0, c - 100), piece(c - 100, c - 100, 50, 1000), piece(c + 900, c + 950, 56, 10)];
        let out = puts(&pieces);
        let span = |put: &Vec<Piece>| put[put.len() - 1].end() - put[0].at;
        assert!(out.iter().all(|p| span(p) <= c), "{out:?}");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], vec![piece(0, 0, 0, c - 100), piece(c - 100, c - 100, 50, 50)], "the rest of the buffer");
        assert_eq!(out[1], vec![piece(c - 50, c, 0, 950), piece(c + 900, c + 950, 56, 10)]);
        for w in out.concat().windows(2) {
            assert_eq!(w[0].end(), w[1].at, "end to end in the block");
            assert_eq!(w[0].file_offset + w[0].bytes, w[1].file_offset, "every file byte once, in order");
        }
        // Where the padding does not fit, the piece starts the next buffer whole.
        let out = puts(&[piece(0, 0, 0, c - 10), piece(c - 10, c - 10, 200, 5)]);
        assert_eq!(out, vec![vec![piece(0, 0, 0, c - 10)], vec![piece(c - 10, c - 10, 200, 5)]]);
        assert!(puts(&[]).is_empty());
    }
}
