//! The JSON results round-trip, the summary keeps its shape, and the chart
//! renders headless.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use loadgen::{
    draw_chart, render_table, run_report, BenchArgs, BenchReport, ChartSeries, LengthSpec,
};

fn args(url: &str) -> BenchArgs {
    BenchArgs {
        url: url.to_owned(),
        model: Some("ok".to_owned()),
        concurrency: Some("1,2".to_owned()),
        requests: 4,
        prompt_tokens: LengthSpec::fixed(16),
        max_tokens: LengthSpec::fixed(8),
        priority_mix: Some("high=1".parse().unwrap()),
        no_progress: true,
        ..BenchArgs::default()
    }
}

#[tokio::test]
async fn report_round_trips_and_summary_keeps_its_shape() {
    let (url, _) = common::start().await;
    let report = run_report(&args(&url), "").await.unwrap();
    let dir = std::env::temp_dir().join(format!("loadgen-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("results.json");
    report.write_json(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let back: BenchReport = serde_json::from_str(&text).unwrap();
    // Structure and every integer survive exactly; times may differ in the
    // last bit of a float, so compare them with a tolerance.
    assert_eq!(back.args, report.args);
    assert_eq!(back.levels.len(), report.levels.len());
    for (a, b) in back.levels.iter().zip(&report.levels) {
        assert_eq!(a.records.len(), b.records.len());
        for (x, y) in a.records.iter().zip(&b.records) {
            assert_eq!(
                (x.index, x.ok, x.output_tokens, x.chunks),
                (y.index, y.ok, y.output_tokens, y.chunks)
            );
            assert_eq!(x.priority, y.priority);
            assert!((x.e2e_ms - y.e2e_ms).abs() < 1e-9);
            assert_eq!(x.itl_gaps_ms.len(), y.itl_gaps_ms.len());
        }
        assert_eq!(a.summary.label, b.summary.label);
        assert_eq!(a.summary.output_tokens, b.summary.output_tokens);
    }
    insta::assert_json_snapshot!("summary", report.summary(), {
        ".url" => "[url]",
        ".runs[].duration_s" => "[s]",
        ".runs[].output_tokens_per_s" => "[rate]",
        ".runs[].requests_per_s" => "[rate]",
        ".**.mean" => "[ms]",
        ".**.p50" => "[ms]",
        ".**.p90" => "[ms]",
        ".**.p99" => "[ms]",
        ".**.max" => "[ms]",
    });
    let table = render_table(&report.summary());
    assert!(table.lines().next().unwrap().contains("TTFT p50/p90/p99"));
    assert!(table.contains("c=1") && table.contains("c=2") && table.contains("high"));

    let chart = dir.join("chart.png");
    let series = [
        ChartSeries {
            name: "a".into(),
            runs: report.summary().runs,
        },
        ChartSeries {
            name: "b".into(),
            runs: back.summary().runs,
        },
    ];
    draw_chart(&chart, "test", "concurrency", &series).unwrap();
    let png = std::fs::read(&chart).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 10_000,
        "a chart with text and lines, not a blank image: {}",
        png.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
