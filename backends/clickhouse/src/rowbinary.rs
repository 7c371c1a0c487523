//! The RowBinary encoding of the rows a fenced insert sends as an external table (see
//! [`crate::sql::fenced_insert`]): the client library encodes the rows of its own inserts,
//! but not for a request it does not make. Columns are written in the order of the row
//! types' fields, which is the order of their tables' migrations (checked by
//! `row_types_match_the_column_lists`); times go as the `UInt32` seconds the external table
//! declares.

use super::{RollupRowCh, VoteRow, WindowRowCh};

/// A row that can append itself, RowBinary-encoded, to a buffer.
pub(crate) trait RowBinary {
    fn encode(&self, out: &mut Vec<u8>);
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn strings(out: &mut Vec<u8>, values: &[String]) {
    varint(out, values.len());
    for value in values {
        string(out, value);
    }
}

fn numbers(out: &mut Vec<u8>, values: &[u64]) {
    varint(out, values.len());
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// The segment columns votes and rollups share, from a row with the segment fields: the
/// standard keys in their order, then a poll's own keys and values.
macro_rules! segment {
    ($out:expr, $row:expr) => {{
        for value in [
            &$row.campaign,
            &$row.channel,
            &$row.source,
            &$row.medium,
            &$row.country,
            &$row.device,
        ] {
            string($out, value);
        }
        strings($out, &$row.dim_keys);
        strings($out, &$row.dim_values);
    }};
}

impl RowBinary for VoteRow {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.log_partition.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        string(out, &self.vote_id);
        string(out, &self.poll_id);
        string(out, &self.voter_key);
        strings(out, &self.choice);
        match self.value {
            Some(value) => {
                out.push(0);
                out.extend_from_slice(&value.to_le_bytes());
            }
            None => out.push(1),
        }
        segment!(out, self);
        out.extend_from_slice(&self.received_at.to_le_bytes());
        out.extend_from_slice(&self.received_ms.to_le_bytes());
    }
}

impl RowBinary for WindowRowCh {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.log_partition.to_le_bytes());
        string(out, &self.poll_id);
        out.extend_from_slice(&self.window_start.to_le_bytes());
        out.extend_from_slice(&self.window_seconds.to_le_bytes());
        string(out, &self.option);
        out.extend_from_slice(&self.votes.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
    }
}

impl RowBinary for RollupRowCh {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.log_partition.to_le_bytes());
        string(out, &self.poll_id);
        out.extend_from_slice(&self.bucket_start.to_le_bytes());
        out.extend_from_slice(&self.bucket_seconds.to_le_bytes());
        segment!(out, self);
        out.extend_from_slice(&self.ballots.to_le_bytes());
        strings(out, &self.answers);
        numbers(out, &self.answer_votes);
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        string(out, &self.dims);
    }
}

#[cfg(test)]
mod tests {
    use super::varint;

    #[test]
    fn lengths_are_leb128() {
        for (n, want) in [
            (0usize, vec![0u8]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            varint(&mut out, n);
            assert_eq!(out, want, "{n}");
        }
    }
}
