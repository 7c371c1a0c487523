//! Text encodings of bytes: the project's one hex writer (voter keys, tokens, request ids,
//! generated keys).

/// `bytes` as lowercase hex, two digits a byte (what `hex::encode` writes, without its
/// per-character iterator: a voter key cost ~1,200 instructions that way).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = vec![0; 2 * bytes.len()];
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_what_the_hex_crate_writes() {
        let every: Vec<u8> = (0..=255).collect();
        assert_eq!(super::hex(&every), hex::encode(&every));
        assert_eq!(super::hex(&[]), "");
        assert_eq!(super::hex(&[0x0f, 0xa0]), "0fa0");
    }
}
