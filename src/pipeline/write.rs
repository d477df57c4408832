//! Writing a pipeline folder: steps cut into chunks of at most the chunk
//! size, named so that name order is chunk order, a manifest, the summary
//! and the derivation map, swapped in at once.

use anyhow::Result;
use camino::Utf8Path;
use serde::Serialize;
use serde_json::Value;

use super::{Pipeline, text};
use crate::drvmap::DrvMap;

/// How many jobs a step creates: a group counts its inner steps.
fn job_weight(step: &Value) -> usize {
    step.get("steps")
        .and_then(Value::as_array)
        .map_or(1, |s| s.len().max(1))
}

/// Cut a phase's steps into chunks of at most `size` jobs each.
pub fn chunk(steps: &[Value], size: usize) -> Vec<Vec<Value>> {
    chunk_ranges(steps, size)
        .into_iter()
        .map(|r| steps[r].to_vec())
        .collect()
}

/// [`chunk`] as index ranges, so writing needs no copy of the steps.
fn chunk_ranges(steps: &[Value], size: usize) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut weight = 0;
    for (i, step) in steps.iter().enumerate() {
        let w = job_weight(step);
        if weight + w > size && i > start {
            chunks.push(start..i);
            start = i;
            weight = 0;
        }
        weight += w;
    }
    if start < steps.len() {
        chunks.push(start..steps.len());
    }
    chunks
}

/// A chunk file: `{"steps": [...]}`.
#[derive(Serialize)]
struct ChunkFile<'a> {
    steps: &'a [Value],
}

#[derive(Debug, Serialize)]
struct Manifest {
    version: u32,
    drvmap: &'static str,
    summary: &'static str,
    phases: Vec<ManifestPhase>,
}

#[derive(Debug, Serialize)]
struct ManifestPhase {
    name: String,
    steps: usize,
    chunks: Vec<String>,
}

/// Chunk file names sort in chunk order: `build-chunk-001.json`, … (TVL's
/// unpadded numbers sorted 1, 10, 11, 2).
fn chunk_name(phase: &str, n: usize, count: usize) -> String {
    let width = count.to_string().len().max(3);
    format!("{phase}-chunk-{n:0width$}.json")
}

/// Check before the (long) evaluation that the output folder can be
/// written, so a mistake fails at once; `write` checks again.
pub fn check_output(out: &Utf8Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!(
            "cannot write the folder {out}: a file of that name is in the way; remove it or choose another output folder"
        );
    }
    refuse_foreign_folder(out)?;
    crate::atomic::check_writable(out)
}

/// The output folder is replaced as a whole: refuse to replace one that
/// drvkite did not write (a mistyped `--out .` must not take the checkout).
fn refuse_foreign_folder(out: &Utf8Path) -> Result<()> {
    let Ok(mut entries) = out.read_dir_utf8() else {
        return Ok(());
    };
    if entries.next().is_some() && !out.join("manifest.json").is_file() {
        anyhow::bail!(
            "output folder {out} holds files but no manifest.json, so drvkite did not write it and will not replace it: choose another --out, or empty the folder"
        );
    }
    Ok(())
}

/// Write the pipeline folder: chunks, manifest, summary and derivation
/// map, all at once: a reader sees the previous folder or the new one.
pub fn write(
    pipeline: &Pipeline,
    drvmap: &DrvMap,
    out: &Utf8Path,
    chunk_size: usize,
) -> Result<Vec<String>> {
    write_with(pipeline, &drvmap.to_tvl_json(), out, chunk_size)
}

/// [`write`], with the derivation map serialised already (`drvmap.json`).
pub fn write_with(
    pipeline: &Pipeline,
    drvmap_json: &str,
    out: &Utf8Path,
    chunk_size: usize,
) -> Result<Vec<String>> {
    refuse_foreign_folder(out)?;
    let staged = crate::atomic::StagedDir::new(out)?;
    let mut files = Vec::new();
    let mut manifest = Manifest {
        version: 1,
        drvmap: "drvmap.json",
        summary: "summary.json",
        phases: Vec::new(),
    };
    let mut chunk_files: Vec<(String, ChunkFile)> = Vec::new();
    for (phase, steps) in &pipeline.phases {
        if steps.is_empty() {
            continue;
        }
        let chunks = chunk_ranges(steps, chunk_size);
        let mut names = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let name = chunk_name(phase, i + 1, chunks.len());
            let file = ChunkFile {
                steps: &steps[c.clone()],
            };
            chunk_files.push((name.clone(), file));
            names.push(name);
        }
        files.extend(names.iter().cloned());
        manifest.phases.push(ManifestPhase {
            name: phase.clone(),
            steps: steps.len(),
            chunks: names,
        });
    }
    // Serialising the steps is most of writing: chunks are independent,
    // so other threads take them while this one writes the rest.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let write_chunks = |part: &[(String, ChunkFile)]| -> Result<()> {
        part.iter()
            .try_for_each(|(name, file)| staged.write(name, &text::to_vec(file)?))
    };
    std::thread::scope(|scope| -> Result<()> {
        let per_thread = chunk_files.len().div_ceil(threads).max(1);
        let handles: Vec<_> = chunk_files
            .chunks(per_thread)
            .map(|part| scope.spawn(move || write_chunks(part)))
            .collect();
        let own = staged.write("drvmap.json", drvmap_json.as_bytes());
        for h in handles {
            h.join().expect("a writing thread panicked")?;
        }
        own
    })?;
    staged.write(
        "summary.json",
        serde_json::to_string_pretty(&pipeline.summary)?.as_bytes(),
    )?;
    staged.write(
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    staged.commit()?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_hold_exactly_size_jobs() {
        let steps: Vec<Value> = (0..2000).map(|i| json!({ "key": i })).collect();
        let sizes: Vec<usize> = chunk(&steps, 192).iter().map(Vec::len).collect();
        assert_eq!(sizes[0], 192);
        assert_eq!(sizes.len(), 11);
        assert_eq!(sizes[10], 2000 - 10 * 192);
        let groups = vec![json!({"group": "g", "steps": [{}, {}]}); 3];
        assert_eq!(
            chunk(&groups, 4).iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 1]
        );
    }

    #[test]
    fn chunk_names_sort_numerically() {
        assert_eq!(chunk_name("build", 2, 11), "build-chunk-002.json");
        assert!(chunk_name("build", 10, 11) > chunk_name("build", 9, 11));
        assert_eq!(chunk_name("build", 7, 1200), "build-chunk-0007.json");
    }
}
