// Command peer is a Go service beside this SDK in the interop tests: it runs the Go SDK itself
// (github.com/ChenBigdata421/jxt-core v1.7.5, sdk/pkg/eventbus) the way a Go service runs it.
// It writes an application YAML with an `eventBus:` section, starts the bus through the SDK's
// own start-up path (config.Setup → eventbus.InitializeFromConfig → eventbus.GetGlobal) and then
// calls only the SDK's public API: PublishEnvelope confirmed through GetPublishResultChannel,
// SubscribeEnvelope, Publish, Subscribe, StartHealthCheckPublisher and Close.
//
//	peer publish        -bus kafka|nats -servers S -topic T      envelopes (JSON lines) from stdin
//	peer publish-plain  -bus kafka|nats -servers S -topic T      raw messages (lines) from stdin
//	peer subscribe      -bus kafka|nats -servers S -topic T [-group G] [-count N] [-work D]
//	                                                              handled envelopes to stdout
//	peer health-publish -bus kafka|nats -servers S -topic T      the SDK's health-check publisher
//	                                                              (on jxt-core-health-check, every second)
//	peer health-read    -bus kafka|nats -servers S -topic T [-group G] [-count N]
//	                                                              health-check messages to stdout
//
// A subscriber writes one JSON line per envelope it handled, once its handler did its work
// ({"aggregate_id", "event_version", "event_id", "event_type", "payload", "handled_at_ns"}: the
// wall clock when the handler began, to merge its handlings with another process's). It stops after -count envelopes, or on SIGTERM or SIGINT, the way a
// Go service stops: bus.Close(). A publisher prints {"published": N} once the SDK reported every
// envelope published on its publish-result channel, then closes the bus.
//
// Every flag maps to a field of the YAML a Go service would write; nothing else is configured.
// On Kafka, -offset-reset is the YAML's kafka.consumer.autoOffsetReset (the SDK's default is
// "latest"; the tests set "earliest", as a service that must not skip what was published before
// it first started does).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ChenBigdata421/jxt-core/sdk/config"
	"github.com/ChenBigdata421/jxt-core/sdk/pkg/eventbus"
)

// results is where the peer's own lines go: the process's original standard output. The SDK's
// logger writes to standard output too, so main points file descriptor 1 at standard error
// before the SDK starts, keeping its log out of the results.
var results = os.Stdout

func main() {
	if fd, err := syscall.Dup(1); err == nil {
		results = os.NewFile(uintptr(fd), "results")
		if err := syscall.Dup3(2, 1, 0); err != nil {
			fail("cannot point the SDK's log at standard error: " + err.Error())
		}
	}
	if len(os.Args) < 2 {
		fail("usage: peer publish|publish-plain|subscribe|health-publish|health-read [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	kind := flags.String("bus", "", "kafka or nats (the YAML's eventBus.type)")
	servers := flags.String("servers", "", "Kafka bootstrap servers or NATS URLs, comma-separated")
	topic := flags.String("topic", "", "topic")
	group := flags.String("group", "go-peer", "Kafka consumer group (kafka.consumer.groupId)")
	offsetReset := flags.String("offset-reset", "earliest", "kafka.consumer.autoOffsetReset")
	service := flags.String("service", "go-peer", "eventBus.serviceName")
	count := flags.Int("count", 0, "stop after this many envelopes (0: until a signal)")
	work := flags.Duration("work", 0, "how long the subscriber's handler works on each envelope")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err.Error())
	}
	if *topic == "" || *servers == "" || (*kind != "kafka" && *kind != "nats") {
		fail("-bus kafka|nats, -servers and -topic are required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	bus, err := start(*kind, strings.Split(*servers, ","), *group, *offsetReset, *service)
	if err != nil {
		fail("start-up: " + err.Error())
	}
	switch os.Args[1] {
	case "publish":
		err = publishEnvelopes(ctx, bus, *topic)
	case "publish-plain":
		err = publishPlain(ctx, bus, *topic)
	case "subscribe":
		err = subscribe(ctx, bus, *topic, *count, *work)
	case "health-publish":
		err = healthPublish(ctx, bus)
	case "health-read":
		err = healthRead(ctx, bus, *topic, *count)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if closeErr := bus.Close(); closeErr != nil && err == nil {
		err = fmt.Errorf("close: %w", closeErr)
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "peer:", message)
	os.Exit(2)
}

// start writes the service's application YAML and starts the bus from it the way a jxt-core
// service does.
func start(kind string, servers []string, group, offsetReset, service string) (eventbus.EventBus, error) {
	quoted := make([]string, len(servers))
	for i, s := range servers {
		quoted[i] = fmt.Sprintf("%q", s)
	}
	list := "[" + strings.Join(quoted, ", ") + "]"
	var section string
	if kind == "kafka" {
		section = fmt.Sprintf("  kafka:\n    brokers: %s\n    consumer:\n      groupId: %q\n      autoOffsetReset: %q\n", list, group, offsetReset)
	} else {
		// JetStream on, as every Go service that publishes envelopes has it (without it the SDK
		// uses core NATS). The stream and durable named here are what a service's YAML says;
		// the SDK ignores both (convertConfig copies only jetstream.enabled and domain) and
		// uses BUSINESS_STREAM over business.> and durables business-consumer-unified_{topic}.
		section = fmt.Sprintf("  nats:\n    urls: %s\n    clientId: %q\n    jetstream:\n      enabled: true\n      stream:\n        name: ORDERS_STREAM\n        subjects: [\"orders.>\"]\n      consumer:\n        durableName: orders-consumer\n", list, service)
	}
	// Health checks on the SDK's default topic; every second, so health-publish sees its first
	// check's result within a second (the SDK reports no result of its first check otherwise).
	yaml := fmt.Sprintf("eventBus:\n  type: %s\n  serviceName: %q\n%s  healthCheck:\n    enabled: true\n    publisher:\n      topic: jxt-core-health-check\n      interval: 1s\n    subscriber:\n      topic: jxt-core-health-check\n", kind, service, section)
	dir, err := os.MkdirTemp("", "go-peer-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "application.yml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		return nil, err
	}
	if err := config.Setup(path); err != nil {
		return nil, err
	}
	if err := eventbus.InitializeFromConfig(config.AppConfig.EventBus); err != nil {
		return nil, err
	}
	bus := eventbus.GetGlobal()
	if bus == nil {
		return nil, fmt.Errorf("eventbus.GetGlobal returned nil after InitializeFromConfig")
	}
	return bus, nil
}

// readLines reads stdin's non-blank lines.
func readLines() ([][]byte, error) {
	var lines [][]byte
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for scanner.Scan() {
		if strings.TrimSpace(scanner.Text()) != "" {
			lines = append(lines, append([]byte(nil), scanner.Bytes()...))
		}
	}
	return lines, scanner.Err()
}

// publishEnvelopes publishes one envelope per line of stdin (decoded by the SDK's FromBytes)
// with PublishEnvelope and waits until the SDK reported each one on its publish-result
// channels: the global one, and for an envelope with a tenant ID the tenant's own (registered
// with RegisterTenant first: the SDK drops the result of an unregistered tenant).
func publishEnvelopes(ctx context.Context, bus eventbus.EventBus, topic string) error {
	lines, err := readLines()
	if err != nil {
		return err
	}
	envelopes := make([]*eventbus.Envelope, 0, len(lines))
	reported := make(chan *eventbus.PublishResult, 1024)
	forward := func(from <-chan *eventbus.PublishResult) {
		for result := range from {
			reported <- result
		}
	}
	go forward(bus.GetPublishResultChannel())
	tenants := map[int]bool{}
	for i, line := range lines {
		envelope, err := eventbus.FromBytes(line)
		if err != nil {
			return fmt.Errorf("line %d: %w", i+1, err)
		}
		envelopes = append(envelopes, envelope)
		if envelope.TenantID != 0 && !tenants[envelope.TenantID] {
			tenants[envelope.TenantID] = true
			if err := bus.RegisterTenant(envelope.TenantID, 0); err != nil {
				return fmt.Errorf("RegisterTenant %d: %w", envelope.TenantID, err)
			}
			go forward(bus.GetTenantPublishResultChannel(envelope.TenantID))
		}
	}
	pending := make(map[string]bool, len(envelopes))
	for _, envelope := range envelopes {
		pending[envelope.EventID] = true
		if err := bus.PublishEnvelope(ctx, topic, envelope); err != nil {
			return fmt.Errorf("PublishEnvelope %s: %w", envelope.EventID, err)
		}
	}
	timeout := time.After(60 * time.Second)
	for len(pending) > 0 {
		select {
		case result := <-reported:
			if result == nil || !pending[result.EventID] {
				continue
			}
			if !result.Success {
				return fmt.Errorf("the SDK reported %s not published: %v", result.EventID, result.Error)
			}
			delete(pending, result.EventID)
		case <-timeout:
			return fmt.Errorf("%d of %d envelopes without a publish result after 60 s", len(pending), len(lines))
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	fmt.Fprintf(results, "{\"published\":%d}\n", len(lines))
	return nil
}

// publishPlain publishes each line of stdin with the SDK's plain Publish; Close then waits for
// what the SDK still sends.
func publishPlain(ctx context.Context, bus eventbus.EventBus, topic string) error {
	lines, err := readLines()
	if err != nil {
		return err
	}
	for _, line := range lines {
		if err := bus.Publish(ctx, topic, line); err != nil {
			return fmt.Errorf("Publish: %w", err)
		}
	}
	fmt.Fprintf(results, "{\"published\":%d}\n", len(lines))
	return nil
}

// handled is what a subscriber writes per envelope.
type handled struct {
	AggregateID  string          `json:"aggregate_id"`
	EventVersion int64           `json:"event_version"`
	EventID      string          `json:"event_id"`
	EventType    string          `json:"event_type"`
	Payload      json.RawMessage `json:"payload"`
	HandledAtNs  int64           `json:"handled_at_ns"`
}

// output serialises lines from the SDK's concurrent handlers and signals when -count were
// written.
type output struct {
	mu      sync.Mutex
	written int
	limit   int
	done    chan struct{}
}

func newOutput(limit int) *output {
	return &output{limit: limit, done: make(chan struct{})}
}

func (o *output) write(line []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	results.Write(append(line, '\n'))
	o.written++
	if o.limit > 0 && o.written == o.limit {
		close(o.done)
	}
}

// subscribe handles envelopes with SubscribeEnvelope until -count were handled or a signal
// came; main then closes the bus, as a Go service does when it stops. The subscription lives as
// long as the service (a background context): Close is what stops it. A line is written when
// the handler has done its work (so it was handled, not only begun), with the time it began.
func subscribe(ctx context.Context, bus eventbus.EventBus, topic string, count int, work time.Duration) error {
	out := newOutput(count)
	err := bus.SubscribeEnvelope(context.Background(), topic, func(_ context.Context, e *eventbus.Envelope) error {
		began := time.Now().UnixNano()
		time.Sleep(work)
		line, _ := json.Marshal(handled{e.AggregateID, e.EventVersion, e.EventID, e.EventType, json.RawMessage(e.Payload), began})
		out.write(line)
		return nil
	})
	if err != nil {
		return fmt.Errorf("SubscribeEnvelope: %w", err)
	}
	fmt.Fprintln(os.Stderr, "peer: subscribed to", topic)
	select {
	case <-out.done:
	case <-ctx.Done():
	}
	return nil
}

// healthPublish starts the SDK's health-check publisher and returns when a check it ran after
// the callback was registered reports its message published.
func healthPublish(ctx context.Context, bus eventbus.EventBus) error {
	if err := bus.StartHealthCheckPublisher(ctx); err != nil {
		return fmt.Errorf("StartHealthCheckPublisher: %w", err)
	}
	checked := make(chan eventbus.HealthCheckResult, 16)
	err := bus.RegisterHealthCheckPublisherCallback(func(_ context.Context, result eventbus.HealthCheckResult) error {
		select {
		case checked <- result:
		default:
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("RegisterHealthCheckPublisherCallback: %w", err)
	}
	timeout := time.After(30 * time.Second)
	for {
		select {
		case result := <-checked:
			if result.Success {
				fmt.Fprintf(results, "{\"published\":1}\n")
				return nil
			}
			fmt.Fprintf(os.Stderr, "peer: health check failed: %+v\n", result)
		case <-timeout:
			return fmt.Errorf("no health-check message published within 30 s")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// healthRead reads the health-check topic with Subscribe, as the SDK's HealthCheckSubscriber
// does, and prints each message its parser accepts (required fields, age, bus type).
func healthRead(ctx context.Context, bus eventbus.EventBus, topic string, count int) error {
	out := newOutput(count)
	parser := eventbus.NewHealthCheckMessageParser()
	err := bus.Subscribe(context.Background(), topic, func(_ context.Context, data []byte) error {
		message, err := parser.Parse(data)
		if err != nil {
			fmt.Fprintln(os.Stderr, "peer: health-check message refused:", err)
			return nil
		}
		line, _ := json.Marshal(message)
		out.write(line)
		return nil
	})
	if err != nil {
		return fmt.Errorf("Subscribe: %w", err)
	}
	select {
	case <-out.done:
	case <-ctx.Done():
	}
	return nil
}
