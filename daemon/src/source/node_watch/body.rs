//! A watch response's body as lines: HTTP/1.1 chunked transfer coding (what kube-apiserver
//! sends) or a plain body, cut at each newline. A line that lies whole inside what one read
//! returned is handed out in place; only one split across reads is copied.

use super::NodeWatchError;

/// The longest line taken: a Node is a few KiB, one with every image listed some 100 KiB.
const MAX_LINE: usize = 16 << 20;
/// A chunk-size line is a hex number and maybe extensions; more than this is not HTTP.
const MAX_SIZE_LINE: usize = 1024;

#[derive(Debug)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(usize),
    /// After a chunk's data: its CRLF, this many bytes left.
    DataEnd(u8),
    /// The last chunk came (what follows, trailers, is not read).
    Done,
    /// A body without transfer coding: everything is data until the connection closes.
    Plain,
}

#[derive(Debug)]
pub struct BodyLines {
    state: State,
    size_line: Vec<u8>,
    /// The start of a line whose end has not come yet.
    partial: Vec<u8>,
}

impl BodyLines {
    pub fn new(chunked: bool) -> BodyLines {
        BodyLines {
            state: if chunked { State::Size } else { State::Plain },
            size_line: Vec::new(),
            partial: Vec::new(),
        }
    }

    /// Whether the last chunk came: the server ended the watch.
    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds what a read returned; `line` gets each complete line (with its newline) and may
    /// stop the feed by returning an error.
    pub fn feed(
        &mut self,
        mut b: &[u8],
        mut line: impl FnMut(&[u8]) -> Result<(), NodeWatchError>,
    ) -> Result<(), NodeWatchError> {
        while !b.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Plain => {
                    self.data(b, &mut line)?;
                    return Ok(());
                }
                State::DataEnd(left) => {
                    let expect: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                    if b[0] != expect[0] {
                        return Err(NodeWatchError::Http(
                            "a chunk's data does not end in CRLF".into(),
                        ));
                    }
                    b = &b[1..];
                    self.state = if left == 2 {
                        State::DataEnd(1)
                    } else {
                        State::Size
                    };
                }
                State::Data(left) => {
                    let k = left.min(b.len());
                    self.data(&b[..k], &mut line)?;
                    b = &b[k..];
                    self.state = if k == left {
                        State::DataEnd(2)
                    } else {
                        State::Data(left - k)
                    };
                }
                State::Size => {
                    let Some(i) = memchr::memchr(b'\n', b) else {
                        self.size_line.extend_from_slice(b);
                        if self.size_line.len() > MAX_SIZE_LINE {
                            return Err(NodeWatchError::Http(
                                "a chunk-size line is too long".into(),
                            ));
                        }
                        return Ok(());
                    };
                    self.size_line.extend_from_slice(&b[..i]);
                    b = &b[i + 1..];
                    let size = chunk_size(&self.size_line)?;
                    self.size_line.clear();
                    self.state = if size == 0 {
                        State::Done
                    } else {
                        State::Data(size)
                    };
                }
            }
        }
        Ok(())
    }

    fn data(
        &mut self,
        mut b: &[u8],
        line: &mut impl FnMut(&[u8]) -> Result<(), NodeWatchError>,
    ) -> Result<(), NodeWatchError> {
        while let Some(i) = memchr::memchr(b'\n', b) {
            if self.partial.is_empty() {
                line(&b[..=i])?;
            } else {
                self.partial.extend_from_slice(&b[..=i]);
                let r = line(&self.partial);
                self.partial.clear();
                r?;
            }
            b = &b[i + 1..];
        }
        if self.partial.len() + b.len() > MAX_LINE {
            return Err(NodeWatchError::Http(format!(
                "a watch event longer than {MAX_LINE} bytes"
            )));
        }
        self.partial.extend_from_slice(b);
        Ok(())
    }
}

/// A chunk-size line's size: hex digits, then maybe `;extensions`, then CR.
fn chunk_size(l: &[u8]) -> Result<usize, NodeWatchError> {
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    let hex = l.split(|c| *c == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex).unwrap_or_default().trim();
    if hex.is_empty() || hex.len() > 15 {
        return Err(NodeWatchError::Http(format!(
            "bad chunk size {:?}",
            String::from_utf8_lossy(l)
        )));
    }
    usize::from_str_radix(hex, 16).map_err(|_| {
        NodeWatchError::Http(format!("bad chunk size {:?}", String::from_utf8_lossy(l)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunked: bool, reads: &[&[u8]]) -> (Vec<String>, bool) {
        let mut b = BodyLines::new(chunked);
        let mut out = Vec::new();
        for r in reads {
            b.feed(r, |l| {
                out.push(String::from_utf8(l.to_vec()).unwrap());
                Ok(())
            })
            .unwrap();
        }
        (out, b.done())
    }

    fn chunked(parts: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
        }
        v
    }

    #[test]
    fn lines_come_whole_however_the_reads_and_chunks_cut_them() {
        let body = chunked(&["{\"a\":1}\n{\"b\"", ":2}\n", "{\"c\":3}\n{\"d\":4}\n"]);
        let want = vec!["{\"a\":1}\n", "{\"b\":2}\n", "{\"c\":3}\n", "{\"d\":4}\n"];
        // Every way to cut the body into two reads, and one byte at a time.
        for cut in 0..=body.len() {
            let (got, done) = lines_of(true, &[&body[..cut], &body[cut..]]);
            assert_eq!(got, want, "cut at {cut}");
            assert!(!done);
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(lines_of(true, &bytes).0, want);
    }

    #[test]
    fn the_last_chunk_ends_the_body_and_extensions_are_ignored() {
        let mut body = b"8;ext=1\r\n{\"a\":1}\n\r\n".to_vec();
        body.extend_from_slice(b"0\r\n\r\n");
        let (got, done) = lines_of(true, &[&body]);
        assert_eq!(got, vec!["{\"a\":1}\n"]);
        assert!(done);
        // Upper-case hex.
        let body = format!("1A\r\n{}\n\r\n", "x".repeat(25));
        assert_eq!(lines_of(true, &[body.as_bytes()]).0.len(), 1);
    }

    #[test]
    fn a_plain_body_is_lines_until_it_closes() {
        let (got, done) = lines_of(false, &[b"{\"a\":1}\n{\"b\"", b":2}\n{\"c\""]);
        assert_eq!(got, vec!["{\"a\":1}\n", "{\"b\":2}\n"]);
        assert!(!done);
    }

    #[test]
    fn malformed_chunking_is_an_error() {
        for body in [
            &b"zz\r\nabc\r\n"[..],
            b"\r\n",
            b"3\r\nabcXY",
            b"ffffffffffffffffff\r\n",
        ] {
            let mut b = BodyLines::new(true);
            assert!(b.feed(body, |_| Ok(())).is_err(), "{body:?}");
        }
        let mut b = BodyLines::new(true);
        assert!(b.feed(&vec![b'1'; 2000], |_| Ok(())).is_err());
    }

    #[test]
    fn the_line_callback_can_stop_the_feed() {
        let mut b = BodyLines::new(false);
        let mut n = 0;
        let r = b.feed(b"a\nb\nc\n", |_| {
            n += 1;
            if n == 2 {
                Err(NodeWatchError::Gone)
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(NodeWatchError::Gone)));
        assert_eq!(n, 2);
    }
}
