//! The JSONL export of a tenant's items: one JSON object per line,
//! `{"collection", "id", "version", "update_time_ms", "attributes"}`,
//! written to a temporary file, synced and renamed into place.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_types::value::Kind;
use tenantmesh_proto::data::v1::{Item, StoredItem};

fn value(v: &prost_types::Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, Into::into),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => object(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value).collect(),
    }
}

fn object(s: &prost_types::Struct) -> serde_json::Value {
    s.fields.iter().map(|(k, v)| (k.clone(), value(v))).collect::<serde_json::Map<_, _>>().into()
}

/// One export line of a stored item.
pub fn line(item: &StoredItem) -> Result<String, String> {
    let decoded = Item::decode(item.data.as_slice()).map_err(|e| format!("item {}: {e}", item.sort_key))?;
    let json = serde_json::json!({
        "collection": decoded.collection,
        "id": decoded.id,
        "version": item.version,
        "update_time_ms": decoded.update_time_ms,
        "attributes": decoded.attributes.as_ref().map_or(serde_json::Value::Null, object),
    });
    Ok(json.to_string())
}

/// An export being written: lines go to `<path>.tmp` (mode 0600: tenant
/// data), and [`ExportFile::finish`] syncs it and renames it into place,
/// so `path` is only ever a whole export. One dropped unfinished (an
/// export that failed) removes its temporary file.
pub struct ExportFile {
    file: Option<std::io::BufWriter<std::fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
    bytes: u64,
}

impl Drop for ExportFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl ExportFile {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let tmp = path.with_extension("jsonl.tmp");
        let file = tenantmesh_storage::files::create_private(&tmp)?;
        Ok(Self { file: Some(std::io::BufWriter::new(file)), tmp, path: path.to_owned(), bytes: 0 })
    }

    pub fn append(&mut self, lines: &[String]) -> std::io::Result<()> {
        let file = self.file.as_mut().expect("an unfinished export");
        for l in lines {
            file.write_all(l.as_bytes())?;
            file.write_all(b"\n")?;
            self.bytes += l.len() as u64 + 1;
        }
        Ok(())
    }

    /// Syncs the export and renames it into place: its size in bytes.
    pub fn finish(mut self) -> std::io::Result<u64> {
        let file = self.file.take().expect("an unfinished export");
        let file = match file.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp);
                return Err(e.into_error());
            }
        };
        let done = (|| {
            file.sync_all()?;
            drop(file);
            std::fs::rename(&self.tmp, &self.path)?;
            std::fs::File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done.map(|()| self.bytes)
    }
}

/// An [`ExportFile`] written from async code: each write runs on the
/// blocking pool. Dropped unfinished, it leaves nothing behind.
pub struct Writer {
    file: Option<ExportFile>,
    path: PathBuf,
    lines: usize,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> crate::engine::StepError + '_ {
    move |e| crate::engine::StepError::transient(format!("export {}: {e}", path.display()))
}

fn join_error(e: tokio::task::JoinError) -> crate::engine::StepError {
    crate::engine::StepError::permanent(e.to_string())
}

impl Writer {
    pub async fn create(path: PathBuf) -> Result<Self, crate::engine::StepError> {
        let target = path.clone();
        let file = tokio::task::spawn_blocking(move || ExportFile::create(&target))
            .await
            .map_err(join_error)?
            .map_err(io_error(&path))?;
        Ok(Self { file: Some(file), path, lines: 0 })
    }

    pub async fn append(&mut self, lines: Vec<String>) -> Result<(), crate::engine::StepError> {
        let mut file = self.file.take().expect("an unfinished export");
        let n = lines.len();
        let file = tokio::task::spawn_blocking(move || file.append(&lines).map(|()| file))
            .await
            .map_err(join_error)?
            .map_err(io_error(&self.path))?;
        self.file = Some(file);
        self.lines += n;
        Ok(())
    }

    /// Syncs it and renames it into place: its path, size in bytes and lines.
    pub async fn finish(mut self) -> Result<(PathBuf, u64, usize), crate::engine::StepError> {
        let file = self.file.take().expect("an unfinished export");
        let bytes = tokio::task::spawn_blocking(move || file.finish())
            .await
            .map_err(join_error)?
            .map_err(io_error(&self.path))?;
        Ok((self.path, bytes, self.lines))
    }
}

/// Writes `lines` to `path` atomically (temporary file, fsync, rename).
#[cfg(test)]
fn write_atomically(path: &Path, lines: &[String]) -> std::io::Result<u64> {
    let mut file = ExportFile::create(path)?;
    file.append(lines)?;
    file.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_item_as_json() {
        let mut attrs = prost_types::Struct::default();
        attrs.fields.insert("n".into(), prost_types::Value { kind: Some(Kind::NumberValue(2.0)) });
        attrs.fields.insert("s".into(), prost_types::Value { kind: Some(Kind::StringValue("x".into())) });
        let item = Item { collection: "notes".into(), id: "1".into(), attributes: Some(attrs), ..Default::default() };
        let stored = StoredItem { sort_key: "notes#1".into(), version: 3, data: item.encode_to_vec() };
        let v: serde_json::Value = serde_json::from_str(&line(&stored).unwrap()).unwrap();
        assert_eq!(v["collection"], "notes");
        assert_eq!(v["version"], 3);
        assert_eq!(v["attributes"]["n"], 2.0);
        assert_eq!(v["attributes"]["s"], "x");
        assert!(line(&StoredItem { data: vec![0xff], ..stored }).is_err());
    }

    #[test]
    fn the_export_is_private_and_complete() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exports/acme.jsonl");
        write_atomically(&path, &["{}".into(), "{\"a\":1}".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n{\"a\":1}\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(write_atomically(&path, &[]).unwrap(), 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        // One that fails (dropped unfinished) leaves no temporary file.
        let mut failed = ExportFile::create(&dir.path().join("exports/gone.jsonl")).unwrap();
        failed.append(&["{}".into()]).unwrap();
        drop(failed);
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("exports")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["acme.jsonl"]);
    }
}
