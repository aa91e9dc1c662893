//! A checkpoint: one `.safetensors` file, or a directory of shards (with or without
//! `model.safetensors.index.json`), indexed in place. Nothing is copied or converted; only headers are read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{header_len, parse_header, TensorEntry};

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One shard file, opened twice: buffered (pread, mmap) and, where the filesystem allows, with `O_DIRECT`.
#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    /// `None` where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE and network filesystems).
    pub direct: Option<File>,
    /// Size at open time. A shard that shrinks later is caught at read time.
    pub size: u64,
    /// The header's `__metadata__` (string to string), empty when it has none.
    pub metadata: BTreeMap<String, String>,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub shard: usize,
    /// Absolute offset in the shard file.
    pub offset: u64,
    pub nbytes: u64,
}

#[derive(Debug)]
pub struct Checkpoint {
    pub root: PathBuf,
    pub shards: Vec<Shard>,
    /// All tensors, in shard order then file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open a `.safetensors` file or a checkpoint directory and validate every header.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let root = path.as_ref().to_path_buf();
        let meta =
            std::fs::metadata(&root).map_err(|e| Error::checkpoint(&root, format!("cannot open checkpoint: {e}")))?;
        let (shard_paths, index) = if meta.is_dir() { Self::discover(&root)? } else { (vec![root.clone()], None) };

        let mut shards = Vec::with_capacity(shard_paths.len());
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (shard_idx, p) in shard_paths.into_iter().enumerate() {
            let (shard, entries) = open_shard(&p)?;
            for TensorEntry { name, dtype, shape, offset, nbytes } in entries {
                if let Some(&prev) = by_name.get(&name) {
                    let other = &shards.get(tensors[prev].shard).map_or(&p, |s: &Shard| &s.path);
                    return Err(Error::checkpoint(
                        &p,
                        format!("tensor {name:?} is also in {} (duplicate names across shards)", other.display()),
                    ));
                }
                by_name.insert(name.clone(), tensors.len());
                tensors.push(TensorInfo { name, dtype, shape, shard: shard_idx, offset, nbytes });
            }
            shards.push(shard);
        }

        if let Some((index_path, weight_map)) = index {
            for (name, file) in &weight_map {
                let Some(&i) = by_name.get(name) else {
                    return Err(Error::checkpoint(
                        &index_path,
                        format!("index maps tensor {name:?} to {file}, which has no such tensor"),
                    ));
                };
                let actual = &shards[tensors[i].shard].path;
                if actual.file_name().and_then(|f| f.to_str()) != Some(file.as_str()) {
                    return Err(Error::checkpoint(
                        &index_path,
                        format!("index maps tensor {name:?} to {file}, but it is in {}", actual.display()),
                    ));
                }
            }
        }
        Ok(Checkpoint { root, shards, tensors, by_name })
    }

    /// The shard files of a directory, with the index's weight map when there is one.
    #[allow(clippy::type_complexity)]
    fn discover(dir: &Path) -> Result<(Vec<PathBuf>, Option<(PathBuf, BTreeMap<String, String>)>)> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            let text = std::fs::read(&index_path)
                .map_err(|e| Error::checkpoint(&index_path, format!("cannot read index: {e}")))?;
            let index: IndexFile = serde_json::from_slice(&text)
                .map_err(|e| Error::checkpoint(&index_path, format!("index is not valid: {e}")))?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            let mut paths = Vec::with_capacity(files.len());
            for f in files {
                if f.contains('/') || f == ".." {
                    return Err(Error::checkpoint(
                        &index_path,
                        format!("index names shard {f:?} outside the directory"),
                    ));
                }
                let p = dir.join(f);
                if !p.is_file() {
                    return Err(Error::checkpoint(&index_path, format!("index names shard {f}, which is missing")));
                }
                paths.push(p);
            }
            if paths.is_empty() {
                return Err(Error::checkpoint(&index_path, "index has an empty weight_map"));
            }
            return Ok((paths, Some((index_path, index.weight_map))));
        }
        let rd = std::fs::read_dir(dir).map_err(|e| Error::checkpoint(dir, format!("cannot list directory: {e}")))?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::checkpoint(dir, "directory holds no .safetensors files"));
        }
        Ok((paths, None))
    }

    pub fn get(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| Error::UnknownTensor(name.to_owned()))
    }

    /// Position of `name` in [`Checkpoint::tensors`].
    pub fn index(&self, name: &str) -> Result<usize> {
        self.by_name.get(name).copied().ok_or_else(|| Error::UnknownTensor(name.to_owned()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Check that shard `i` is still the file that was opened, and not shorter than `needed_end`: a file replaced
    /// after `open` (a re-download) or truncated gives a clear error before any byte of it is read.
    pub fn check_shard(&self, i: usize, needed_end: u64) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let s = &self.shards[i];
        let opened = s.file.metadata().map_err(|e| Error::checkpoint(&s.path, format!("cannot stat: {e}")))?;
        if let Ok(now) = std::fs::metadata(&s.path) {
            if (now.dev(), now.ino()) != (opened.dev(), opened.ino()) {
                return Err(Error::checkpoint(
                    &s.path,
                    "was replaced after the store opened it: open the checkpoint again to read the new file",
                ));
            }
        }
        if opened.len() < needed_end {
            return Err(Error::Truncated { path: s.path.clone(), file_end: opened.len(), needed_end });
        }
        Ok(())
    }

    /// Total bytes of tensor data.
    pub fn nbytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }
}

fn open_shard(path: &Path) -> Result<(Shard, Vec<TensorEntry>)> {
    let mut file = File::open(path).map_err(|e| Error::checkpoint(path, format!("cannot open: {e}")))?;
    let size = file.metadata().map_err(|e| Error::checkpoint(path, format!("cannot stat: {e}")))?.len();
    let mut prefix = [0u8; 8];
    if size >= 8 {
        file.read_exact(&mut prefix).map_err(|e| Error::checkpoint(path, format!("cannot read header: {e}")))?;
    }
    let n = header_len(path, prefix, size)?;
    let mut json = vec![0u8; n as usize];
    file.read_exact_at(&mut json, 8).map_err(|e| Error::checkpoint(path, format!("cannot read header: {e}")))?;
    let header = parse_header(path, &json, size)?;
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
    Ok((Shard { path: path.to_path_buf(), file, direct, size, metadata: header.metadata }, header.entries))
}
