//! A watch on the tar stream between the decompressor and the tar reader.
//! The tar reader buffers GNU long names and pax extended headers whole,
//! whatever size their header declares, before anything else can look at
//! them: a tiny blob declaring a 4 GiB header would take gigabytes of
//! memory. This reads every header as it streams past, before the tar
//! reader sees the data it announces, and stops the stream when:
//!
//! - a long name or long link target is bigger than a path may be;
//! - a pax header (`x`, `g`) or a sparse file shows up (persist never
//!   writes them, and their `size` records would make this watch and the
//!   tar reader disagree on where entries start);
//! - an entry other than a regular file or a long name carries data;
//! - the regular files add up to more than the unpacked cap.
//!
//! Sizes are parsed exactly as the tar reader parses them.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

const BLOCK: usize = 512;

/// Why the stream was stopped, for the error message (the tar reader wraps
/// I/O errors in its own words).
pub type Verdict = Rc<RefCell<Option<String>>>;

enum State {
    Header {
        buf: Box<[u8; BLOCK]>,
        filled: usize,
    },
    Data {
        left: u64,
    },
    /// The end-of-archive block was read; the tar reader stops there.
    End,
}

pub struct Guard<R> {
    inner: R,
    state: State,
    max_name: u64,
    max_unpacked: u64,
    unpacked: u64,
    verdict: Verdict,
}

impl<R: Read> Guard<R> {
    /// Watch `inner`: long names up to `max_name` bytes, regular files up to
    /// `max_unpacked` in all.
    pub fn new(inner: R, max_name: u64, max_unpacked: u64) -> (Guard<R>, Verdict) {
        let verdict = Verdict::default();
        let guard = Guard {
            inner,
            state: State::Header {
                buf: Box::new([0; BLOCK]),
                filled: 0,
            },
            max_name,
            max_unpacked,
            unpacked: 0,
            verdict: verdict.clone(),
        };
        (guard, verdict)
    }

    /// Look at a whole header; what follows it, or why the stream stops.
    fn inspect(&mut self, h: &[u8; BLOCK]) -> Result<State, String> {
        if h.iter().all(|b| *b == 0) {
            return Ok(State::End);
        }
        let size = size_field(&h[124..136])?;
        let kind = h[156];
        match kind {
            b'L' | b'K' if size > self.max_name => {
                return Err(format!(
                    "a header declares a {} name of {size} bytes, more than a path may have \
                     ({} bytes)",
                    if kind == b'L' { "long" } else { "link" },
                    self.max_name
                ));
            }
            b'L' | b'K' => {}
            b'x' | b'g' => {
                return Err(
                    "the archive has a pax extended header, which persist never \
                            writes"
                        .into(),
                );
            }
            b'S' => return Err("the archive has a sparse file".into()),
            b'0' | b'\0' | b'7' => {
                self.unpacked = self.unpacked.saturating_add(size);
                if self.unpacked > self.max_unpacked {
                    return Err(format!(
                        "the archive unpacks to more than {}",
                        super::super::format_size(self.max_unpacked)
                    ));
                }
            }
            _ if size != 0 => {
                return Err(format!(
                    "an entry of type {:?} declares {size} bytes of data",
                    kind as char
                ));
            }
            _ => {}
        }
        let padded = size
            .checked_add(BLOCK as u64 - 1)
            .ok_or("a header declares an impossible size")?
            & !(BLOCK as u64 - 1);
        Ok(if padded == 0 {
            State::Header {
                buf: Box::new([0; BLOCK]),
                filled: 0,
            }
        } else {
            State::Data { left: padded }
        })
    }

    /// Follow `bytes`, the next part of the stream.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::End => return Ok(()),
                State::Data { left } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Header {
                            buf: Box::new([0; BLOCK]),
                            filled: 0,
                        };
                    }
                }
                State::Header { buf, filled } => {
                    let n = (BLOCK - *filled).min(bytes.len());
                    buf[*filled..*filled + n].copy_from_slice(&bytes[..n]);
                    *filled += n;
                    bytes = &bytes[n..];
                    if *filled == BLOCK {
                        let header = std::mem::replace(buf, Box::new([0; BLOCK]));
                        self.state = self.inspect(&header)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = self.verdict.borrow().as_ref() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let n = self.inner.read(out)?;
        if let Err(why) = self.follow(&out[..n]) {
            *self.verdict.borrow_mut() = Some(why.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        Ok(n)
    }
}

/// A size field as the tar crate reads it: base-256 when the high bit of
/// the first byte is set (the last 8 bytes), else octal text up to a NUL.
fn size_field(src: &[u8]) -> Result<u64, String> {
    if src[0] & 0x80 != 0 {
        return Ok(src[src.len() - 8..]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b)));
    }
    let text = src.split(|b| *b == 0).next().unwrap_or_default();
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| u64::from_str_radix(t.trim(), 8).ok())
        .ok_or_else(|| "a header has an unreadable size".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn run(stream: &[u8]) -> Result<usize, String> {
        let (mut g, verdict) = Guard::new(stream, 4097, 1000);
        let mut sink = Vec::new();
        match io::copy(&mut g, &mut sink) {
            Ok(n) => Ok(n as usize),
            Err(_) => Err(verdict.borrow().clone().unwrap()),
        }
    }

    #[test]
    fn headers_are_checked_before_their_data_is_read() {
        let mut ok = header(b'0', 600);
        ok.extend(vec![7u8; 1024]);
        ok.extend(header(b'L', 4097));
        ok.extend(vec![b'a'; 4608]);
        ok.extend(header(b'5', 0));
        ok.extend(vec![0u8; 1024]);
        assert_eq!(run(&ok), Ok(ok.len()));

        let mut long = header(b'L', 1 << 30);
        long.extend(vec![b'a'; 4096]);
        assert!(
            run(&long)
                .unwrap_err()
                .contains("long name of 1073741824 bytes")
        );
        assert!(run(&header(b'x', 10)).unwrap_err().contains("pax"));
        assert!(run(&header(b'g', 10)).unwrap_err().contains("pax"));
        assert!(
            run(&header(b'5', 10))
                .unwrap_err()
                .contains("declares 10 bytes")
        );
        assert!(
            run(&header(b'0', 1001))
                .unwrap_err()
                .contains("unpacks to more")
        );
        // Base-256 sizes count as well.
        let mut big = header(b'0', 0);
        big[124] = 0x80;
        big[135] = 0xff;
        big[134] = 0xff;
        assert!(run(&big).unwrap_err().contains("unpacks to more"));
    }
}
