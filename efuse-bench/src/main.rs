//! `efuse-bench`: the latency comparison of `efuse bench`, a program of
//! its own so that the daemon links no plotting (plotters, fonts). It
//! mounts efuse targets with the `efuse` program installed beside it.

mod bench;
mod plot;

use std::path::PathBuf;

use clap::Parser;

/// `efuse-bench` (also run as `efuse bench`).
#[derive(Debug, Parser, Clone)]
#[command(
    name = "efuse bench",
    version,
    about = "efuse's latency comparison: the raw directory, plain FUSE, every efuse tier and peer FUSE filesystems, interleaved"
)]
pub struct BenchArgs {
    /// Small dataset and few repetitions (under 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Where results.md, results.json and the plots go.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Where the bench makes its scratch directory `efuse-bench/` (dataset, mount points) [default: $TMPDIR].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the dataset in the scratch directory afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Files of the dataset-epoch workload [default: 1,000,000; 20,000 with --quick].
    #[arg(long)]
    pub files: Option<usize>,
    /// Run only these workloads (comma-separated: stat, cold-lookup, walk, open-read, seq-read,
    /// rand-read, create-unlink, loader, py-read, ls-l, epoch).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

fn main() {
    let args = BenchArgs::parse();
    if let Err(e) = bench::run(&args) {
        eprintln!("efuse bench: {e:#}");
        std::process::exit(1);
    }
}
