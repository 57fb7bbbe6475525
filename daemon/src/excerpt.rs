//! Short excerpts of untrusted text for logs and error messages: anyone who can write etcd
//! chooses lease keys and values (up to 1.5 MiB each), and echoing them whole would let them
//! fill the node's log on every re-list.

use std::borrow::Cow;

/// How much of an untrusted value a message echoes.
pub const ECHO_MAX: usize = 64;

/// `s` cut to at most `max` bytes (on a char boundary), saying how long it really was.
pub fn excerpt(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...({} bytes)", &s[..end], s.len()))
}

/// `excerpt` with the default length.
pub fn echo(s: &str) -> Cow<'_, str> {
    excerpt(s, ECHO_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept() {
        assert_eq!(echo("10.244.1.0-24"), "10.244.1.0-24");
        assert!(matches!(echo("x"), Cow::Borrowed(_)));
    }

    #[test]
    fn long_text_is_cut_and_measured() {
        let long = "a".repeat(1_500_000);
        let e = echo(&long);
        assert!(e.len() < ECHO_MAX + 24, "{}", e.len());
        assert!(e.ends_with("...(1500000 bytes)"), "{e}");
    }

    #[test]
    fn cuts_on_a_char_boundary() {
        let s = "é".repeat(100); // two bytes each
        let e = excerpt(&s, 5);
        assert!(e.starts_with("éé..."), "{e}");
    }
}
