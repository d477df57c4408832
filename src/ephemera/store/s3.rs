//! The S3-compatible store (AWS S3, MinIO, Garage, Ceph…), through the
//! `object_store` crate. Manifests are written with `If-None-Match: *`
//! (`PutMode::Create`), so the bucket itself refuses to replace one; blobs
//! go up in multipart uploads when large.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use tokio::io::AsyncWriteExt;

use super::{Listed, S3Options};

pub struct S3Store {
    store: Arc<AmazonS3>,
    bucket: String,
    /// Without leading or trailing slashes; may be empty.
    prefix: String,
}

impl S3Store {
    pub fn new(bucket: &str, prefix: &str, options: &S3Options) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().with_context(|| {
            format!(
                "cannot configure the S3 store s3://{bucket}: check the AWS_* variables \
                 (credentials, AWS_REGION) and --s3-endpoint"
            )
        })?;
        Ok(S3Store {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    fn full(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{key}", self.prefix),
        }
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        ObjectPath::parse(self.full(key)).with_context(|| format!("bad object key {key:?}"))
    }

    pub async fn put_file(&self, key: &str, src: &Path) -> Result<()> {
        let mut writer = BufWriter::new(self.store.clone(), self.path(key)?);
        let mut file = std::fs::File::open(src)?;
        let mut buf = vec![0u8; 8 << 20];
        let result = async {
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n]).await?;
            }
            writer.shutdown().await
        }
        .await;
        if let Err(e) = result {
            let _ = writer.abort().await;
            return Err(e.into());
        }
        Ok(())
    }

    pub async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        let payload = PutPayload::from(bytes);
        match self
            .store
            .put_opts(&self.path(key)?, payload, PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.path(key)?, PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.store.get(&self.path(key)?).await {
            Ok(result) => Ok(Some(result.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn download<W: Write>(&self, key: &str, out: &mut W) -> Result<bool> {
        let result = match self.store.get(&self.path(key)?).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk?)?;
        }
        Ok(true)
    }

    /// Objects below `prefix`. One object whose key the client cannot
    /// represent (an empty part, `.`, `..`, a control character) makes a
    /// whole listing page fail; then the prefix is listed folder by folder
    /// so only the folder holding it is left out (reported in `odd`).
    pub async fn list(&self, prefix: &str, odd: &mut Vec<String>) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        // (prefix, try a flat listing first)
        let mut pending = vec![(prefix.to_string(), true)];
        while let Some((p, flat)) = pending.pop() {
            if flat {
                match self.list_flat(&p).await {
                    Ok(found) => out.extend(found),
                    Err(e) if unreadable_key(&e) => pending.push((p, false)),
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            let base = if p.is_empty() {
                None
            } else {
                Some(self.path(&p)?)
            };
            match self.store.list_with_delimiter(base.as_ref()).await {
                Ok(level) => {
                    for meta in level.objects {
                        if let Some(l) = self.listed(meta) {
                            out.push(l);
                        }
                    }
                    for sub in level.common_prefixes {
                        if let Some(k) = self.relative(sub.as_ref()) {
                            pending.push((k.to_string(), true));
                        }
                    }
                }
                Err(e) if unreadable_key(&e) => {
                    odd.push(format!("an object in {}/ ({e})", self.location(&p)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    async fn list_flat(&self, prefix: &str) -> object_store::Result<Vec<Listed>> {
        let base = if prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::parse(self.full(prefix))?)
        };
        let mut stream = self.store.list(base.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            if let Some(l) = self.listed(meta?) {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// A key relative to the store's prefix, if it lies below it.
    fn relative<'a>(&self, location: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(location)
        } else {
            location
                .strip_prefix(self.prefix.as_str())
                .and_then(|k| k.strip_prefix('/'))
        }
    }

    fn listed(&self, meta: ObjectMeta) -> Option<Listed> {
        let key = self.relative(meta.location.as_ref())?;
        Some(Listed {
            key: key.to_string(),
            size: meta.size,
            modified: meta.last_modified.into(),
        })
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.full(key))
    }
}

/// Did listing fail because of an object's key (which the client cannot
/// parse) rather than the store?
fn unreadable_key(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::InvalidPath { .. })
        || e.to_string().contains("invalid list response")
}
