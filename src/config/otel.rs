//! OpenTelemetry trace export: off unless an OTLP endpoint is set. The flags read the standard
//! `OTEL_*` variables, so a fleet's usual environment turns it on without anything specific to
//! this service.

use clap::{Args, ValueEnum};
use opentelemetry_sdk::trace::Sampler;
use url::Url;

use super::{ConfigError, flag};

/// Which spans are kept, by the names of `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerName {
    #[value(name = "always_on")]
    AlwaysOn,
    #[value(name = "always_off")]
    AlwaysOff,
    #[value(name = "traceidratio")]
    TraceIdRatio,
    #[value(name = "parentbased_always_on")]
    ParentBasedAlwaysOn,
    #[value(name = "parentbased_always_off")]
    ParentBasedAlwaysOff,
    #[value(name = "parentbased_traceidratio")]
    ParentBasedTraceIdRatio,
}

/// Trace export settings.
#[derive(Debug, Clone, Args)]
pub struct OtelSettings {
    /// OTLP/gRPC collector to send traces to (e.g. http://127.0.0.1:4317). Unset: no traces, and
    /// no trace work on any call.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<Url>,

    /// The `service.name` of every span.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "credential-service")]
    pub otel_service_name: String,

    /// Which traces are kept: a caller's sampled trace is continued with the `parentbased_*`
    /// samplers; `*traceidratio` keeps the share --otel-traces-sampler-arg of new traces.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = SamplerName::ParentBasedAlwaysOn)]
    pub otel_traces_sampler: SamplerName,

    /// The ratio of the `*traceidratio` samplers, from 0 to 1 (default 1); ignored by the others.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,
}

/// Trace export, checked: where to, under which name, which traces.
#[derive(Debug, Clone)]
pub struct OtelConfig {
    pub endpoint: Url,
    pub service_name: String,
    pub sampler: Sampler,
    /// The same sampler, as each call's span applies it before the span is made.
    pub calls: CallSampling,
}

/// Which calls get a span, decided from the caller's `traceparent` before any span is made, so
/// that a call left out costs no span at all (the SDK's sampler would decide only once one was
/// made): the configured sampler, applied to a call's span.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallSampling {
    /// A caller's sampled flag decides (the `parentbased_*` samplers).
    pub follow_parent: bool,
    /// The share of the other calls that start a trace.
    pub ratio: f64,
}

impl CallSampling {
    /// Whether a call is traced, given the caller's span context (`None` without one) and a
    /// uniform draw from [0, 1).
    pub fn sampled(&self, caller_sampled: Option<bool>, draw: f64) -> bool {
        match caller_sampled {
            Some(sampled) if self.follow_parent => sampled,
            _ => draw < self.ratio,
        }
    }
}

impl OtelSettings {
    /// `None` when no endpoint is set (traces off). A ratio that is not a number from 0 to 1 is
    /// refused rather than replaced by a default: a typo should not send every trace.
    pub fn resolve(&self) -> Result<Option<OtelConfig>, ConfigError> {
        let Some(endpoint) = self.otel_endpoint.clone() else {
            return Ok(None);
        };
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(ConfigError(format!(
                "{} must be an http:// or https:// URL",
                flag("otel_endpoint")
            )));
        }
        let ratio = match &self.otel_traces_sampler_arg {
            None => 1.0,
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    ConfigError(format!(
                        "{} must be a number from 0 to 1",
                        flag("otel_traces_sampler_arg")
                    ))
                })?,
        };
        let parent = |root| Sampler::ParentBased(Box::new(root));
        let (sampler, follow_parent, ratio) = match self.otel_traces_sampler {
            SamplerName::AlwaysOn => (Sampler::AlwaysOn, false, 1.0),
            SamplerName::AlwaysOff => (Sampler::AlwaysOff, false, 0.0),
            SamplerName::TraceIdRatio => (Sampler::TraceIdRatioBased(ratio), false, ratio),
            SamplerName::ParentBasedAlwaysOn => (parent(Sampler::AlwaysOn), true, 1.0),
            SamplerName::ParentBasedAlwaysOff => (parent(Sampler::AlwaysOff), true, 0.0),
            SamplerName::ParentBasedTraceIdRatio => {
                (parent(Sampler::TraceIdRatioBased(ratio)), true, ratio)
            }
        };
        Ok(Some(OtelConfig {
            endpoint,
            service_name: self.otel_service_name.clone(),
            sampler,
            calls: CallSampling {
                follow_parent,
                ratio,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        otel: OtelSettings,
    }

    fn resolve(args: &[&str]) -> Result<Option<OtelConfig>, ConfigError> {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().otel.resolve()
    }

    #[test]
    fn off_without_an_endpoint() {
        assert!(resolve(&[]).unwrap().is_none());
        assert!(
            resolve(&["--otel-traces-sampler", "always_on"])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_standard_sampler_names_and_ratio() {
        let config = resolve(&[
            "--otel-endpoint",
            "http://127.0.0.1:4317",
            "--otel-traces-sampler",
            "parentbased_traceidratio",
            "--otel-traces-sampler-arg",
            "0.01",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            format!("{:?}", config.sampler),
            format!(
                "{:?}",
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01)))
            )
        );
        assert_eq!(config.service_name, "credential-service");
        let calls = config.calls;
        assert!(
            calls.sampled(Some(true), 0.99),
            "a sampled caller is followed"
        );
        assert!(!calls.sampled(Some(false), 0.0), "so is an unsampled one");
        assert!(calls.sampled(None, 0.009) && !calls.sampled(None, 0.01));
    }

    #[test]
    fn a_bad_ratio_is_refused_naming_the_flag_and_variable() {
        for arg in ["1.5", "-0.1", "lots"] {
            let arg = format!("--otel-traces-sampler-arg={arg}");
            let e = resolve(&["--otel-endpoint", "http://127.0.0.1:4317", &arg]).unwrap_err();
            assert!(
                e.to_string()
                    .contains("--otel-traces-sampler-arg / OTEL_TRACES_SAMPLER_ARG"),
                "{e}"
            );
        }
    }
}
