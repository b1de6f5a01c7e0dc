# Run before each user's own script (sieve_before): mail the spam filter marked goes to Junk, as mda
# does itself in Maildir mode. The user's script still runs and can file it elsewhere.
require ["fileinto", "mailbox"];
if anyof (header :is "X-Spam" "Yes", header :is "X-Spam-Flag" "YES",
          header :matches "X-Spam-Status" "Yes*") {
  fileinto :create "Junk";
}
