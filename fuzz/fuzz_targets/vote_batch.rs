//! The NDJSON batch parser: any bytes as a batch body. Must never panic; every line it
//! accepts names a poll.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(lines) = tally_ingest::parse_batch(data, 10_000) {
        assert!(!lines.is_empty() && lines.len() <= 10_000);
        let mut last = 0;
        for (line, parsed) in lines {
            assert!(line > last, "lines are numbered in order");
            last = line;
            if let Ok((poll_id, request)) = parsed {
                assert_eq!(request.poll_id.as_deref(), Some(poll_id.as_str()));
            }
        }
    }
});
