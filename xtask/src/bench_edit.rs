//! (being built)

pub fn run(_args: &[&str]) -> anyhow::Result<()> {
    anyhow::bail!("`bench_edit` is not built yet")
}
