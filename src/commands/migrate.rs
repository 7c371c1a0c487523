//! `tally migrate`: applies the warehouse's schema migrations and exits.

use clap::Args;

use crate::config::WarehouseArgs;

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    warehouse: WarehouseArgs,
}

impl MigrateArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let (_, applied) = self.warehouse.open().await?;
        println!("warehouse schema is current (applied now: {applied:?})");
        Ok(())
    }
}
