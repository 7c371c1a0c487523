//! `tally repartition --to N [--partitions-per-stream K]`: changes the partition count of
//! the vote log (and how many partitions a stream holds), once every poll that took votes
//! has left it and no service runs (docs/OPERATIONS.md, "The broker's shape").

use clap::Args;

use crate::config::Bus;

#[derive(Args)]
pub struct RepartitionArgs {
    #[command(flatten)]
    bus: Bus,
    /// The new number of vote log partitions. With `--partitions-per-stream K` the log is
    /// also laid over streams of K partitions (0: one stream); without it the streams stay
    /// laid out as they are.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    to: u16,
}

impl RepartitionArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.bus.connect().await?;
        let to = self.to;
        match tally_nats::repartition(client, to, self.bus.partitions_per_stream).await? {
            tally_nats::Repartitioned::NoStream => {
                let setting = match self.bus.partitions_per_stream {
                    Some(k) if k > 0 && k < to => format!(" TALLY_PARTITIONS_PER_STREAM={k}"),
                    _ => String::new(),
                };
                println!(
                    "there is no vote stream yet: start every service with \
                     TALLY_PARTITIONS={to}{setting}; the first to start creates the log with them"
                );
            }
            tally_nats::Repartitioned::Changed { from, layout } => {
                let from = from.map_or_else(|| "unrecorded".to_owned(), |n| n.to_string());
                let (laid, setting) = match layout.streams() {
                    1 => ("one stream".to_owned(), String::new()),
                    n => (
                        format!("{n} streams of {} partitions", layout.per_stream()),
                        format!(" TALLY_PARTITIONS_PER_STREAM={}", layout.per_stream()),
                    ),
                };
                println!(
                    "the vote log's votes are now written with {to} partitions (was {from}) \
                     over {laid}: start every service with TALLY_PARTITIONS={to}{setting}"
                );
            }
        }
        Ok(())
    }
}
