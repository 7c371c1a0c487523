//! How the vote log's partitions lie over JetStream streams.
//!
//! A stream has one leader, which takes every write to it, so one stream caps intake at
//! what one server can store. With `TALLY_PARTITIONS_PER_STREAM=K` the partitions are cut
//! into groups of K, each its own stream (`VOTES`, `VOTES_1`, `VOTES_2`, …) whose leader a
//! cluster may place on another server. A partition's subjects (`votes.<partition>.…`) and
//! everything tally keeps per partition (its consumer, its watermark, its purges) stay in
//! the one stream that holds the partition. Sequences are per stream; tally's positions are
//! already per partition, so they never compare across streams.

use super::VOTES_STREAM;

/// The streams of `partitions` partitions, `per_stream` to a stream (0: all in one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    partitions: u16,
    per_stream: u16,
}

impl StreamLayout {
    pub fn new(partitions: u16, per_stream: u16) -> Self {
        let partitions = partitions.max(1);
        let per_stream = match per_stream {
            0 => partitions,
            n => n.min(partitions),
        };
        StreamLayout {
            partitions,
            per_stream,
        }
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Partitions to a stream (the partition count when there is one stream).
    pub fn per_stream(&self) -> u16 {
        self.per_stream
    }

    /// How many streams hold the log.
    pub fn streams(&self) -> u16 {
        self.partitions.div_ceil(self.per_stream)
    }

    /// The stream (by number) holding `partition`.
    pub fn stream_of(&self, partition: u16) -> u16 {
        partition / self.per_stream
    }

    /// The name of stream `stream`: `VOTES` for the first, as with one stream, then
    /// `VOTES_<n>`.
    pub fn name(&self, stream: u16) -> String {
        match stream {
            0 => VOTES_STREAM.to_owned(),
            n => format!("{VOTES_STREAM}_{n}"),
        }
    }

    /// The name of the stream holding `partition`.
    pub fn name_of(&self, partition: u16) -> String {
        self.name(self.stream_of(partition))
    }

    /// Every stream's name, in order.
    pub fn names(&self) -> Vec<String> {
        (0..self.streams())
            .map(|stream| self.name(stream))
            .collect()
    }

    /// The partitions stream `stream` holds.
    pub fn partitions_of(&self, stream: u16) -> std::ops::Range<u16> {
        let first = stream.saturating_mul(self.per_stream).min(self.partitions);
        first..first.saturating_add(self.per_stream).min(self.partitions)
    }

    /// The subjects stream `stream` takes: `votes.>` when one stream holds the log (as
    /// tally always made it), else one `votes.<partition>.>` per partition it holds.
    pub fn subjects(&self, stream: u16) -> Vec<String> {
        if self.streams() == 1 {
            return vec!["votes.>".to_owned()];
        }
        self.partitions_of(stream)
            .map(|partition| format!("votes.{partition}.>"))
            .collect()
    }

    /// The layout a stream taking `subjects` belongs to, with `partitions` partitions in
    /// all: `None` when they are neither `votes.>` nor one run of `votes.<p>.>` subjects
    /// starting at 0 (the first stream's).
    pub fn of_first_stream(subjects: &[String], partitions: u16) -> Option<StreamLayout> {
        if subjects.iter().any(|s| s == "votes.>") {
            return Some(StreamLayout::new(partitions, 0));
        }
        let per_stream = u16::try_from(subjects.len()).ok().filter(|&n| n > 0)?;
        let layout = StreamLayout::new(partitions, per_stream);
        (layout.subjects(0) == subjects).then_some(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stream_takes_every_vote_subject() {
        for layout in [
            StreamLayout::new(1, 0),
            StreamLayout::new(8, 0),
            StreamLayout::new(8, 8),
            StreamLayout::new(4, 16),
        ] {
            assert_eq!(layout.streams(), 1, "{layout:?}");
            assert_eq!(layout.names(), ["VOTES"]);
            assert_eq!(layout.subjects(0), ["votes.>"]);
            for partition in 0..layout.partitions() {
                assert_eq!(layout.stream_of(partition), 0);
            }
        }
    }

    #[test]
    fn partitions_are_cut_into_streams_of_equal_runs() {
        let layout = StreamLayout::new(10, 4);
        assert_eq!(layout.streams(), 3);
        assert_eq!(layout.names(), ["VOTES", "VOTES_1", "VOTES_2"]);
        assert_eq!(layout.partitions_of(0), 0..4);
        assert_eq!(layout.partitions_of(1), 4..8);
        assert_eq!(layout.partitions_of(2), 8..10);
        assert_eq!(
            layout.subjects(2),
            ["votes.8.>".to_owned(), "votes.9.>".to_owned()]
        );
        let held: Vec<u16> = (0..10).map(|p| layout.stream_of(p)).collect();
        assert_eq!(held, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
        assert_eq!(layout.name_of(9), "VOTES_2");
        // Every partition is in exactly one stream, the one `stream_of` names.
        for stream in 0..layout.streams() {
            for partition in layout.partitions_of(stream) {
                assert_eq!(layout.stream_of(partition), stream);
            }
        }
        assert_eq!(StreamLayout::new(4, 1).names().len(), 4);
        // The largest counts: the last stream's run ends at the last partition.
        let widest = StreamLayout::new(u16::MAX, 40_000);
        assert_eq!(widest.streams(), 2);
        assert_eq!(widest.partitions_of(1), 40_000..u16::MAX);
        assert_eq!(widest.stream_of(u16::MAX - 1), 1);
    }

    #[test]
    fn the_first_streams_subjects_tell_the_layout() {
        let one = vec!["votes.>".to_owned()];
        assert_eq!(
            StreamLayout::of_first_stream(&one, 8),
            Some(StreamLayout::new(8, 0))
        );
        let grouped = StreamLayout::new(8, 2);
        assert_eq!(
            StreamLayout::of_first_stream(&grouped.subjects(0), 8),
            Some(grouped)
        );
        let foreign = vec!["votes.1.>".to_owned(), "votes.2.>".to_owned()];
        assert_eq!(StreamLayout::of_first_stream(&foreign, 8), None);
        assert_eq!(StreamLayout::of_first_stream(&[], 8), None);
    }
}
