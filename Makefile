# Install zrpc's binaries, man pages and systemd units. Build first, as
# yourself, then install (as root if PREFIX needs it): `make install` never
# builds, so nothing is compiled as root.
#   make build && sudo make install           # into /usr/local, units into /etc/systemd/system
#   make install PREFIX=/usr DESTDIR=/tmp/pkgroot
#   make install-examples                     # test_server/test_client into $(PREFIX)/lib/zrpc/examples
# The Debian package (scripts/package-check.sh) is the other way to install.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/zrpc
EXAMPLEDIR ?= $(PREFIX)/lib/zrpc/examples
UNITDIR ?= /etc/systemd/system
POLICYDIR ?= /etc/zrpc
DESTDIR ?=
CARGO ?= cargo
RELEASE = target/release

BINS = zrpcd zrpc
EXAMPLES = test_server test_client
UNITS = zrpcd.socket zrpcd.service
EXAMPLE_UNITS = zrpc-test-server.service
MAN1 = zrpc.1 zrpc-call.1 zrpc-list.1 zrpc-monitor.1 zrpc-stats.1 zrpc-completions.1
MAN8 = zrpcd.8

.PHONY: build install install-examples uninstall test check-built check-built-examples man

build:
	$(CARGO) build --release --locked -p zrpcd -p zrpc-cli -p zrpc-examples

# Regenerates man/ from the clap definitions (xtask/tests/man.rs checks
# the committed pages are current).
man:
	$(CARGO) xtask man man

check-built:
	@for b in $(BINS); do \
	  if [ ! -x $(RELEASE)/$$b ]; then \
	    echo "make install: $(RELEASE)/$$b is missing; run 'make build' first, as yourself (install does not build, so nothing is compiled as root)" >&2; \
	    exit 1; \
	  fi; \
	done

check-built-examples:
	@for b in $(EXAMPLES); do \
	  if [ ! -x $(RELEASE)/$$b ]; then \
	    echo "make install-examples: $(RELEASE)/$$b is missing; run 'make build' first, as yourself" >&2; \
	    exit 1; \
	  fi; \
	done

install: check-built
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR)
	for b in $(BINS); do install -m755 $(RELEASE)/$$b $(DESTDIR)$(BINDIR)/$$b; done
	for m in $(MAN1); do gzip -9n < man/$$m > $(DESTDIR)$(MANDIR)/man1/$$m.gz; chmod 644 $(DESTDIR)$(MANDIR)/man1/$$m.gz; done
	for m in $(MAN8); do gzip -9n < man/$$m > $(DESTDIR)$(MANDIR)/man8/$$m.gz; chmod 644 $(DESTDIR)$(MANDIR)/man8/$$m.gz; done
	install -m644 README.md $(DESTDIR)$(DOCDIR)/README.md
	for u in $(UNITS); do \
	  sed -e 's|/usr/bin/zrpcd|$(BINDIR)/zrpcd|g' -e 's|/usr/share/doc/zrpc|$(DOCDIR)|g' \
	    systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$u; \
	done
	# The example access policy where zrpcd looks for it; an existing
	# policy is never overwritten.
	install -d $(DESTDIR)$(POLICYDIR)
	test -e $(DESTDIR)$(POLICYDIR)/policy.toml || install -m644 systemd/policy.toml $(DESTDIR)$(POLICYDIR)/policy.toml

# The example service and client, under their own directory rather than
# on PATH with generic names, with the example service's unit.
install-examples: check-built-examples
	install -d $(DESTDIR)$(EXAMPLEDIR) $(DESTDIR)$(UNITDIR)
	for b in $(EXAMPLES); do install -m755 $(RELEASE)/$$b $(DESTDIR)$(EXAMPLEDIR)/$$b; done
	for u in $(EXAMPLE_UNITS); do \
	  sed 's|/usr/local/lib/zrpc/examples|$(EXAMPLEDIR)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u; \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$u; \
	done

uninstall:
	for b in $(BINS); do rm -f $(DESTDIR)$(BINDIR)/$$b; done
	for m in $(MAN1); do rm -f $(DESTDIR)$(MANDIR)/man1/$$m.gz; done
	for m in $(MAN8); do rm -f $(DESTDIR)$(MANDIR)/man8/$$m.gz; done
	rm -f $(DESTDIR)$(DOCDIR)/README.md
	for b in $(EXAMPLES); do rm -f $(DESTDIR)$(EXAMPLEDIR)/$$b; done
	for u in $(UNITS) $(EXAMPLE_UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done

test:
	$(CARGO) test --workspace
