//! `tally repartition --to N`: changes the partition count of the vote stream, once every
//! poll that took votes has left it and no service runs (docs/OPERATIONS.md, "The
//! broker's shape").

use clap::Args;

use crate::config::Bus;

#[derive(Args)]
pub struct RepartitionArgs {
    #[command(flatten)]
    bus: Bus,
    /// The new number of vote log partitions.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    to: u16,
}

impl RepartitionArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.bus.connect().await?;
        let to = self.to;
        match tally_nats::repartition(client, to).await? {
            tally_nats::Repartitioned::NoStream => println!(
                "there is no vote stream yet: start every service with TALLY_PARTITIONS={to} \
                 and the first one creates it with that count"
            ),
            tally_nats::Repartitioned::Changed { from } => {
                let from = from.map_or_else(|| "unrecorded".to_owned(), |n| n.to_string());
                println!(
                    "the vote stream's votes are now written with {to} partitions (was \
                     {from}): start every service with TALLY_PARTITIONS={to}"
                );
            }
        }
        Ok(())
    }
}
